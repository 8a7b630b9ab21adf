"""Training stages on the tiny Llama: every method trains, DPO learns an easy preference, reruns are
cache hits, seeds repeat, data_seed reorders the same rows, the reference cache equals TRL's own
numbers, NaN stops cleanly, an interrupted stage resumes, stages chain (merged), and config typos
are named.

Sequences are kept short (a one-line system prompt replaces SmolLM2's long default) because the
tiny model's cost is dominated by its 49k-token vocabulary.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from alignscope.align import (
    StageConfig,
    StageFailed,
    StageResult,
    align_command,
    load_stage_config,
    parse_stages,
    read_reference,
    stage_reference,
    train_stage,
)
from alignscope.data.preferences import PreferencePair, to_trl_rows, write_preferences
from alignscope.errors import InputError

SYSTEM = {"role": "system", "content": "Be brief."}
TOPICS = ["tea", "rain", "maps", "bread", "chess", "moss", "kites", "owls", "jazz", "salt", "ice", "clay"]


def easy_pairs(n: int = 8, long_rejected: bool = False) -> list[PreferencePair]:
    """Chosen is always the same short phrase; rejected varies. An easy, learnable preference."""
    pairs = [PreferencePair(id=f"p{i}", prompt=(SYSTEM, {"role": "user", "content": f"Tell me about {TOPICS[i]}."}),
                            chosen="Sure thing.", rejected=f"No, {TOPICS[i]} is dull.")
             for i in range(n)]
    if long_rejected:  # one pair whose rejected reply is cut by max_length (counted in the summary)
        pairs[-1] = PreferencePair(id=pairs[-1].id, prompt=pairs[-1].prompt, chosen="Sure thing.",
                                   rejected=" ".join(["blah"] * 60))
    return pairs


def stage(**kw) -> StageConfig:
    base = dict(max_steps=1, per_device_train_batch_size=2, max_length=40, dtype="float32",
                learning_rate=1e-3, save_steps=50)
    base.update(kw)
    return StageConfig(**base)


def log_lines(result) -> list[dict]:
    return [json.loads(x) for x in (result.path / "logs.jsonl").read_text().splitlines()]


def adapter_tensors(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter / "adapter_model.safetensors"))


# ------------------------------------------------------------------ every method


@pytest.mark.parametrize("method", ["sft", "ipo", "orpo", "kto", "simpo", "rloo"])
def test_each_method_trains_with_a_finite_loss(method, tiny_model_dir, tmp_path):
    extra = {"reward": "length", "max_completion_length": 4} if method == "rloo" else {}
    result = train_stage(str(tiny_model_dir), stage(method=method, **extra), easy_pairs(4), tmp_path)
    summary = result.summary
    assert summary["method"] == method and summary["steps"] == 1
    assert math.isfinite(summary["final_loss"])
    assert (result.adapter / "adapter_config.json").exists() and result.model_dir is None
    logs = log_lines(result)
    assert logs[0]["step"] == 1 and "loss" in logs[0] and "learning_rate" in logs[0]
    if method == "kto":
        assert "kl" in logs[0]  # KL is logged where TRL computes it
        assert summary["n_examples"] == 8  # each pair gives a desirable and an undesirable example
    if method == "ipo":
        assert summary["config"]["loss_type"] is None and result.summary["reference"]["cache_hit"] is False


# ------------------------------------------------------------------ DPO: learns, caches, matches TRL


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-run")
    pairs = easy_pairs(8, long_rejected=True)
    cfg = stage(method="dpo", max_steps=6, learning_rate=2e-3, beta=0.5, precompute_ref_batch_size=3)
    return out, pairs, cfg, train_stage(str(tiny_model_dir), cfg, pairs, out)


def test_dpo_loss_decreases_on_an_easy_set(dpo_run):
    _, _, _, result = dpo_run
    logs = [x for x in log_lines(result) if "loss" in x]
    assert [x["step"] for x in logs] == [1, 2, 3, 4, 5, 6]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.02
    assert logs[-1]["rewards/margins"] > 0 and "rewards/accuracies" in logs[-1]
    summary = result.summary
    assert summary["n_truncated"] == 1 and summary["n_prompt_too_long"] == 0
    assert summary["pairs_per_s"] > 0 and summary["train_time_s"] > 0
    assert summary["reference"]["cache_hit"] is False
    for key in ("method", "steps", "final_loss", "config", "base_fingerprint", "data_fingerprint"):
        assert summary[key] is not None


def test_rerun_is_a_cache_hit_without_training(dpo_run, tiny_model_dir, monkeypatch):
    out, pairs, cfg, first = dpo_run
    import alignscope.align.recipes as recipes

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage must not build a trainer again")

    monkeypatch.setattr(recipes, "build_trainer", no_training)
    again = train_stage(str(tiny_model_dir), cfg, pairs, out)
    assert again.cached and again.path == first.path
    # log/checkpoint settings are not part of the key
    assert train_stage(str(tiny_model_dir), cfg.model_copy(update={"logging_steps": 5}), pairs, out).cached


def test_reference_cache_equals_trls_own_reference(dpo_run, tiny_model_dir, tmp_path):
    """Our stored values vs (a) TRL's stock precompute and (b) TRL's in-step reference (step-1 rewards)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from alignscope.models import load

    _, pairs, cfg, result = dpo_run
    ours = stage_reference(result.path).set_index("id")
    assert read_reference(result.path.parents[1] / result.summary["reference"]["path"]).shape[0] == len(pairs)
    fresh = load(str(tiny_model_dir), dtype="float32", device="cpu")  # TRL wraps it with LoRA in place
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_length=cfg.max_length,
                     precompute_ref_log_probs=True, precompute_ref_batch_size=2, per_device_train_batch_size=2,
                     activation_checkpointing=False, report_to="none")
    trainer = DPOTrainer(model=fresh.model, args=args, train_dataset=Dataset.from_list(to_trl_rows(pairs)),
                         processing_class=fresh.tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    theirs = trainer.train_dataset.to_pandas().set_index("id")
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.loc[theirs.index, column].tolist() == pytest.approx(theirs[column].tolist(), abs=1e-4)
    assert bool(ours.loc["p7", "truncated"]) and not ours.drop(index="p7")["truncated"].any()
    # In-step check: at step 1 the policy equals the reference, so TRL's rewards computed against our
    # cached values must be zero.
    first = log_lines(result)[0]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-5)


def test_a_subset_of_earlier_data_reuses_reference_rows(dpo_run, tiny_model_dir):
    """Curation retrains on a subset: its reference rows come from the earlier table, by token hash."""
    out, pairs, cfg, first = dpo_run
    subset = [p for p in pairs if p.id not in ("p0", "p3")]
    again = train_stage(str(tiny_model_dir), cfg.model_copy(update={"max_steps": 1}), subset, out)
    assert not again.cached and again.summary["reference"]["cache_hit"] is True
    assert again.summary["reference"]["path"] != first.summary["reference"]["path"]
    reused = stage_reference(again.path).set_index("id")
    original = stage_reference(first.path).set_index("id")
    assert list(reused.index) == [p.id for p in subset]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert reused[column].tolist() == original.loc[reused.index, column].tolist()


def test_full_finetuning_saves_weights_and_uses_the_cache(tiny_model_dir, tmp_path):
    from alignscope.models import load

    result = train_stage(str(tiny_model_dir), stage(method="dpo", finetune="full", learning_rate=1e-4),
                         easy_pairs(4), tmp_path)
    assert result.adapter is None and (result.model_dir / "config.json").exists()
    first = log_lines(result)[0]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)  # cached reference = initial weights
    trained = result.load(dtype="float32", device="cpu")
    assert trained.fingerprint != load(str(tiny_model_dir), dtype="float32").fingerprint


def test_same_seed_gives_the_same_adapter(tiny_model_dir, tmp_path):
    pairs = easy_pairs(4)
    cfg = stage(method="dpo", max_steps=2, precompute_ref_log_probs=False)  # TRL's own reference path
    a = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "a")
    b = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "b")
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert any(t.abs().sum() > 0 for n, t in ta.items() if "lora_B" in n)  # it did train


def test_scoring_only_labelled_positions_changes_no_number(tiny_model_dir, tmp_path, monkeypatch):
    """TRL's fused head on CPU projects every position; ours only the labelled ones. Same training."""
    import trl.trainer.utils as trl_utils

    import alignscope.align.stage as stage_module

    projected: list[int] = []  # rows entering the LM-head projection, per call
    kernel = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    pairs = easy_pairs(4)
    cfg = stage(method="dpo", max_steps=2, precompute_ref_log_probs=False)  # policy and reference both
    compact = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "compact")
    rows_compact, projected[:] = sum(projected), []
    monkeypatch.setattr(stage_module, "COMPACT_FUSED_HEAD", False)
    full = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "full")
    assert 0 < rows_compact < sum(projected) / 2  # prompts and padding no longer projected
    steps = [(a, b) for a, b in zip(log_lines(compact), log_lines(full), strict=True) if "loss" in a]
    assert len(steps) == 2
    for ours, trls in steps:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "entropy",
                    "logits/chosen", "mean_token_accuracy"):
            assert ours[key] == pytest.approx(trls[key], rel=1e-5, abs=1e-5), key
    ta, tb = adapter_tensors(compact), adapter_tensors(full)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-4, atol=1e-6)
    assert not trl_utils._use_triton(torch.device("cpu"))  # restored after the stage


# ------------------------------------------------------------------ failure, interruption, chaining


class _PoisonAfter(TrainerCallback):
    """From the given step on, the embeddings output NaN, so the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(StageFailed) as info:
        train_stage(str(tiny_model_dir), stage(method="dpo", max_steps=4, save_steps=1), easy_pairs(4),
                    tmp_path, callbacks=[_PoisonAfter(2)])
    message = str(info.value)
    assert "nan" in message and "step 3" in message and "checkpoint-2" in message
    [work] = list((tmp_path / ".work" / "align").iterdir())
    assert (work / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (work / "checkpoint-3").exists()
    assert [json.loads(x)["step"] for x in (work / "logs.jsonl").read_text().splitlines()] == [1, 2]
    assert not any((tmp_path / "align").glob("*/.done"))  # no finished-looking artefact


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt


def test_interrupted_stage_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    cfg = stage(method="simpo", max_steps=3, save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        train_stage(str(tiny_model_dir), cfg, easy_pairs(4), tmp_path, callbacks=[_Interrupt()])
    result = train_stage(str(tiny_model_dir), cfg, easy_pairs(4), tmp_path)
    assert not result.cached and result.summary["resumed_from_step"] == 1
    assert result.summary["steps"] == 3
    assert [x["step"] for x in log_lines(result) if "loss" in x] == [1, 2, 3]
    assert not (tmp_path / ".work" / "align" / result.key).exists()  # checkpoints cleaned up


def test_sft_then_dpo_chains_through_the_merged_model(tiny_model_dir, tmp_path):
    from alignscope.models import load

    data = write_preferences(easy_pairs(4), tmp_path / "pairs.jsonl")
    config = tmp_path / "recipe.yaml"
    config.write_text("stages:\n"
                      "  - {method: sft, learning_rate: 1.0e-3, per_device_train_batch_size: 2, max_length: 40,"
                      " dtype: float32}\n"
                      "  - {method: dpo, learning_rate: 1.0e-3, per_device_train_batch_size: 2, max_length: 40,"
                      " dtype: float32}\n")
    final = StageResult.from_dir(align_command(str(tiny_model_dir), None, data, tmp_path / "run", config=config,
                                               max_steps=1))
    summary = final.summary
    assert summary["method"] == "dpo" and summary["start_model_in_run"].startswith("merged/")
    merged = load(final.start_model, dtype="float32", device="cpu")
    assert merged.fingerprint == summary["base_fingerprint"]  # stage 2 (and its reference) start at SFT merged
    assert merged.fingerprint != load(str(tiny_model_dir), dtype="float32").fingerprint
    ref = json.loads((tmp_path / "run" / summary["reference"]["path"] / "inputs.json").read_text())
    assert ref["reference"] == merged.fingerprint
    with pytest.raises(InputError, match="omit --method"):
        align_command(str(tiny_model_dir), "kto", data, tmp_path / "run", config=config)


# ------------------------------------------------------------------ configuration


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("method: dpo\nlearning_rat: 1.0e-4\n")
    with pytest.raises(InputError, match=r"'learning_rat'.*did you mean 'learning_rate'"):
        load_stage_config(path)
    path.write_text("stages:\n  - method: sft\n  - method: dpo\n    lora: {rank: 4}\n")
    with pytest.raises(InputError, match=r"'rank' in stages.1.lora.*did you mean 'r'"):
        load_stage_config(path)
    with pytest.raises(InputError, match="trl.bogus_flag: not an argument of DPOConfig"):
        from alignscope.align.recipes import check_trl_passthrough

        check_trl_passthrough(parse_stages({"method": "dpo", "trl": {"bogus_flag": 1}})[0])
    with pytest.raises(InputError, match="not a TRL DPO loss"):
        parse_stages({"method": "dpo", "loss_type": "sigmoidd"})
    # TRL 1.16's sigmoid and IPO losses do not read label_smoothing: a setting that would do nothing is refused
    with pytest.raises(InputError, match="ignores it for loss_type sigmoid \\(the default\\)"):
        parse_stages({"method": "dpo", "label_smoothing": 0.1})
    with pytest.raises(InputError, match="ignores it for loss_type ipo"):
        parse_stages({"method": "ipo", "label_smoothing": 0.1})
    assert parse_stages({"method": "dpo", "loss_type": "robust", "label_smoothing": 0.1})[0].label_smoothing == 0.1
    assert parse_stages({"method": "simpo", "label_smoothing": 0.1})[0].label_smoothing == 0.1  # CPO reads it
    ok = parse_stages({"method": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5],
                       "trl": {"ld_alpha": 0.5}})[0]
    assert ok.resolved("loss_type") == ["sigmoid", "sft"]
    assert StageConfig(method="ipo").resolved("loss_type") == ["ipo"]
    assert StageConfig(method="sft", finetune="full").resolved("learning_rate") == pytest.approx(2e-5)


# ------------------------------------------------------------------ data order


def _dpo_training_rows(monkeypatch, tokenizer) -> list[str]:
    """Patch our trainers' training step to record the pairs each DPO micro-batch trains on, as text
    (a DPO batch stacks the chosen rows, then the rejected ones; the chosen half names the pair)."""
    from alignscope.align import recipes

    seen: list[str] = []
    original = recipes.FiniteLossGuard.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"]
        seen.extend(tokenizer.decode(row, skip_special_tokens=True) for row in ids[: len(ids) // 2])
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(recipes.FiniteLossGuard, "training_step", recording)
    return seen


def test_data_seed_changes_the_order_of_the_same_rows(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    seen = _dpo_training_rows(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir))
    orders = []
    for data_seed in (None, 0, 1):
        cfg = stage(method="dpo", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2, data_seed=data_seed)
        train_stage(str(tiny_model_dir), cfg, easy_pairs(8), tmp_path / str(data_seed))
        orders.append(list(seen))
        seen.clear()
    unset, same, other = orders
    assert len(unset) == 8 and unset == same  # unset means the stage seed
    assert sorted(other) == sorted(unset) and other != unset


def test_data_seed_enters_the_cache_key_only_when_set():
    """Stages trained before the option existed keep their keys."""
    assert "data_seed" not in StageConfig().result_dict()
    assert StageConfig(data_seed=3).result_dict()["data_seed"] == 3


# ------------------------------------------------------------------ zero-loss pairs (curation's leave-k-out)


def _lora_b(result) -> dict[str, torch.Tensor]:
    return {k: v for k, v in adapter_tensors(result).items() if "lora_B" in k}


# Rows a pair gives the trainer: KTO has a desirable and an undesirable row per pair.
ZERO_LOSS_ROWS = {"dpo": 1, "sft": 1, "orpo": 1, "simpo": 1, "kto": 2}


@pytest.mark.parametrize("method", list(ZERO_LOSS_ROWS))
def test_zeroing_a_pair_leaves_exactly_the_other_pairs_gradient(method, tiny_model_dir, tmp_path):
    """One plain-SGD step from LoRA's B = 0: B moves by −lr·∇(batch loss). With p1 zeroed in the batch
    {p0, p1} the normaliser still counts p1, so the step is p0 alone's step times p0's share of it:
    DPO and SimPO (pair mean) and KTO (mean over the four replies, its detached KL baseline 0 while
    policy = reference) give ½; SFT's token mean gives n0/(n0+n1) and ORPO's loss adds such a token
    mean (the NLL over the chosen rows) to a pair mean, both ½ because p0 and p1 have equally long
    chosen sequences (checked). A hook that zeroed the wrong rows, or none, or a KL term that carried
    p1's gradient, would move B along p1's gradient instead."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = easy_pairs(2)
    lengths = {len(tokenizer(tokenizer.apply_chat_template([*p.prompt, {"role": "assistant", "content": p.chosen}],
                                                           tokenize=False)).input_ids) for p in pairs}
    assert len(lengths) == 1
    rows = ZERO_LOSS_ROWS[method]
    sgd = dict(method=method, max_steps=1, optim="sgd", max_grad_norm=0.0, learning_rate=1e-2)
    zeroed = train_stage(str(tiny_model_dir), stage(**sgd, per_device_train_batch_size=2 * rows,
                                                    zero_loss_pairs=["p1"]), pairs, tmp_path / "zeroed")
    alone = train_stage(str(tiny_model_dir), stage(**sgd, per_device_train_batch_size=rows), pairs[:1],
                        tmp_path / "alone")
    both = train_stage(str(tiny_model_dir), stage(**sgd, per_device_train_batch_size=2 * rows), pairs,
                       tmp_path / "both")
    z, a, b = _lora_b(zeroed), _lora_b(alone), _lora_b(both)
    scale = max(float(t.abs().max()) for t in a.values())
    assert scale > 0
    for name in a:
        assert torch.allclose(2 * z[name], a[name], atol=1e-5 * scale, rtol=1e-4), name
    assert max(float((2 * z[n] - b[n]).abs().max()) for n in b) > 1e-2 * scale  # p1 did move the plain stage


@pytest.mark.parametrize("method", list(ZERO_LOSS_ROWS))
def test_zero_loss_on_every_pair_keeps_the_initial_adapter_and_on_none_changes_nothing(method, tiny_model_dir,
                                                                                       tmp_path):
    pairs = easy_pairs(4)
    ids = [p.id for p in pairs]
    plain = train_stage(str(tiny_model_dir), stage(method=method, max_steps=2), pairs, tmp_path / "plain")
    none = train_stage(str(tiny_model_dir), stage(method=method, max_steps=2, zero_loss_pairs=[]), pairs,
                       tmp_path / "none")
    every = train_stage(str(tiny_model_dir), stage(method=method, max_steps=2, zero_loss_pairs=ids), pairs,
                        tmp_path / "every")
    p, n = adapter_tensors(plain), adapter_tensors(none)
    assert all(torch.equal(p[k], n[k]) for k in p)  # weight 1 is exact
    assert all(not t.any() for t in _lora_b(every).values())  # no gradient: B stays at its zero init
    assert any(t.any() for t in _lora_b(plain).values())
    # the forward pass is untouched, so the logged loss still counts the zeroed pairs
    assert log_lines(every)[0]["loss"] == pytest.approx(log_lines(plain)[0]["loss"], abs=1e-6)
    assert every.summary["config"]["zero_loss_pairs"] == sorted(ids)


def test_zero_loss_pairs_are_checked():
    assert "zero_loss_pairs" not in StageConfig().result_dict()  # older stages keep their cache keys
    assert StageConfig(zero_loss_pairs=["b", "a", "b"]).result_dict()["zero_loss_pairs"] == ["a", "b"]
    for method in ZERO_LOSS_ROWS:
        assert StageConfig(method=method, zero_loss_pairs=["p0"]).zero_loss_pairs == ["p0"]
    for bad, words in [(dict(method="rloo"), "not rloo"), (dict(finetune="full"), "finetune: lora"),
                       (dict(lora={"target_modules": ["q_proj", "lm_head"]}), "lm_head"),
                       (dict(loss_type="aot"), "sorts scores"), (dict(trl={"padding_free": True}), "one row"),
                       (dict(method="sft", trl={"packing": True}), "packing puts several examples in one row")]:
        with pytest.raises(ValueError, match=words):
            StageConfig(zero_loss_pairs=["p0"], **bad)


def test_zero_loss_pairs_must_name_the_stages_own_pairs(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="not in the data.*'p9'"):
        train_stage(str(tiny_model_dir), stage(method="dpo", zero_loss_pairs=["p9"]), easy_pairs(2), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
