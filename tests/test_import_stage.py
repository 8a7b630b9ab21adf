"""`alignscope import-stage`: an adapter trained elsewhere becomes a stage that attribution reads as its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_attribute import EchoProbe, planted_pairs
from test_bad_inputs import _without_progress_bars

from alignscope.align.config import StageConfig
from alignscope.align.stage import train_stage
from alignscope.attribute import attribute
from alignscope.cli import main
from alignscope.data.preferences import write_preferences
from alignscope.errors import InputError

OBJECTIVE = {"method": "dpo", "beta": 0.5, "max_length": 48, "dtype": "float32"}


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


def _trained_elsewhere(tiny_model_dir: Path, root: Path, cfg: StageConfig, weights: str):
    """A stage trained by alignscope whose ``weights`` directory (adapter/ or model/), data and settings
    stand in for an external run: (stage, copied weights, data file, one-stage YAML)."""
    native = train_stage(str(tiny_model_dir), cfg, planted_pairs(), root / "native")
    copied = root / f"their-{weights}"
    shutil.copytree(native.path / weights, copied)
    data = root / "their-pairs.jsonl"
    write_preferences(planted_pairs(), data)
    config = root / "stage.yaml"
    config.write_text(yaml.safe_dump(OBJECTIVE))
    return native, copied, data, config


@pytest.fixture(scope="module")
def external(tiny_model_dir, tmp_path_factory):
    """A DPO LoRA stage standing in for an external run."""
    cfg = StageConfig(**OBJECTIVE, max_steps=3, per_device_train_batch_size=4, learning_rate=3e-3, save_steps=50,
                      lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]})
    return _trained_elsewhere(tiny_model_dir, tmp_path_factory.mktemp("import"), cfg, "adapter")


def test_an_imported_adapter_attributes_exactly_like_the_stage_that_trained_it(external, tiny_model_dir, tmp_path,
                                                                                capsys):
    native, adapter, data, config = external
    run = tmp_path / "run"
    args = ["import-stage", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(data),
            "--config", str(config), "--out", str(run)]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    key = printed.split("--stage ")[1].split()[0]
    stage_dir = run / "align" / key
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["imported"]["adapter"] == str(adapter.resolve())
    assert summary["steps"] is None and summary["final_loss"] is None  # unknown, not invented
    assert summary["config"]["lora"] == native.summary["config"]["lora"] | {"target_modules": ["q_proj", "up_proj",
                                                                                               "v_proj"]}
    assert summary["config"]["beta"] == 0.5 and summary["reference"] is None
    assert cli(args) == 0 and f"--stage {key}" in capsys.readouterr().out  # the same import: a cache hit

    ours = attribute(native.path.parents[1], native.path, EchoProbe(), methods=["gradsim"])
    theirs = attribute(run, key, EchoProbe(), methods=["gradsim"])
    a = pd.read_parquet(ours.file("scores.parquet")).set_index("pair_id")
    b = pd.read_parquet(theirs.file("scores.parquet")).set_index("pair_id").loc[a.index]
    # the reference log-probs come from the run's cache on one side and are recomputed with the adapter
    # disabled on the other: the losses and every score agree
    assert np.allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    for column in ("score_gradsim_dot", "score_gradsim_layer_cosine", "score_margin"):
        assert np.allclose(b[column], a[column], rtol=1e-4, atol=1e-7), column
    assert (b["rank"] == a["rank"]).all()
    assert cli(["curate", "--run", str(run), "--attribution", theirs.key, "--drop-top", "2",
                "--out", str(tmp_path / "kept.jsonl")]) == 0


def _broken(adapter: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    edit(copy)
    return copy


def _set(**fields):
    def edit(path: Path) -> None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return edit


def _pickled(path: Path) -> None:
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")


@pytest.mark.parametrize(("edit", "extra", "message"), [
    (lambda p: (p / "adapter_config.json").unlink(), [], "no adapter_config.json"),
    (_pickled, [], "adapter_model.bin is a pickle"),
    (_set(peft_type="IA3"), [], "needs a LoRA adapter"),
    (_set(modules_to_save=["lm_head"]), [], "modules_to_save"),
    (_set(r=2), [], "does not fit model"),
    (lambda p: None, ["--method", "rloo"], "no per-pair objective"),
    (lambda p: None, ["--method", "sft"], "the config says method dpo"),
])
def test_bad_imports_are_one_line_and_write_nothing(external, tiny_model_dir, tmp_path, capsys, edit, extra, message):
    _, adapter, data, config = external
    broken = _broken(adapter, tmp_path, edit)
    use_config = [] if extra == ["--method", "rloo"] else ["--config", str(config)]
    out = tmp_path / "run"
    assert cli(["import-stage", "--model", str(tiny_model_dir), "--adapter", str(broken), "--data", str(data),
                *use_config, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = _without_progress_bars(err)
    assert len(lines) == 1 and lines[0].startswith("alignscope: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_config_whose_lora_block_disagrees_with_the_adapter_is_refused(external, tiny_model_dir, tmp_path):
    from alignscope.align.imported import import_stage

    _, adapter, data, _ = external
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump({**OBJECTIVE, "lora": {"r": 8}}))
    with pytest.raises(InputError, match="lora.r is 8 but the adapter has 4"):
        import_stage(str(tiny_model_dir), adapter, data, tmp_path / "run", config=config)


def test_loading_a_pickled_adapter_is_refused(external, tiny_model_dir, tmp_path):
    from alignscope.models import load

    _, adapter, _, _ = external
    with pytest.raises(InputError, match="pickle"):
        load(str(tiny_model_dir), adapter=_broken(adapter, tmp_path, _pickled))


def _plain_trl_dpo_run(tiny_model_dir: Path, tmp_path: Path, **saving) -> tuple[Path, Path]:
    """A user's own TRL DPO LoRA run (2 steps, logged each step) on the planted pairs: the adapter goes to
    tmp_path/adapter (trainer.save_model), checkpoints to tmp_path/trl; returns (pairs file, stage YAML)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = planted_pairs()
    rows = [{"prompt": [dict(m) for m in p.prompt], "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                     learning_rate=3e-3, beta=0.5, max_length=48, report_to="none", logging_steps=1, **saving)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    data = tmp_path / "pairs.jsonl"
    write_preferences(pairs, data)
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(OBJECTIVE))
    return data, config


def test_an_adapter_saved_by_a_plain_trl_script_imports_and_attributes(tiny_model_dir, tmp_path, capsys):
    """The use case itself: a user's own TRL DPO run (not alignscope's), saved with trainer.save_model."""
    pairs = planted_pairs()
    data, config = _plain_trl_dpo_run(tiny_model_dir, tmp_path, save_strategy="no")
    run = tmp_path / "run"
    assert cli(["import-stage", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                "--data", str(data), "--config", str(config), "--out", str(run)]) == 0
    key = capsys.readouterr().out.split("--stage ")[1].split()[0]
    summary = json.loads((run / "align" / key / "summary.json").read_text())
    assert summary["config"]["lora"]["r"] == 4 and summary["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    scores = pd.read_parquet(attribute(run, key, EchoProbe(), methods=["gradsim"]).file("scores.parquet"))
    assert len(scores) == len(pairs) and np.isfinite(scores["score_gradsim_layer_cosine"]).all()
    assert np.abs(scores["loss"] - np.log(2)).max() > 1e-3  # the adapter moved the policy off the reference


# --------------------------------------------------------------------------- fully fine-tuned checkpoints

FULL = {**OBJECTIVE, "finetune": "full"}


@pytest.fixture(scope="module")
def external_full(tiny_model_dir, tmp_path_factory):
    """A fully fine-tuned DPO stage; its model/ directory stands in for a user's checkpoint."""
    cfg = StageConfig(**FULL, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=50)
    return _trained_elsewhere(tiny_model_dir, tmp_path_factory.mktemp("import-full"), cfg, "model")


def test_an_imported_full_checkpoint_attributes_like_the_stage_that_trained_it(external_full, tiny_model_dir,
                                                                                tmp_path, capsys):
    """The reference is recomputed from the base model and stored in the stage: it equals TRL's own
    cached reference, so losses and scores equal the native stage's."""
    from alignscope.align import stage_reference

    native, checkpoint, data, config = external_full
    run = tmp_path / "run"
    args = ["import-stage", "--model", str(tiny_model_dir), "--checkpoint", str(checkpoint), "--data", str(data),
            "--config", str(config), "--out", str(run)]
    assert cli(args) == 0
    key = capsys.readouterr().out.split("--stage ")[1].split()[0]
    stage_dir = run / "align" / key
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["finetune"] == "full" and summary["imported"]["checkpoint"] == str(checkpoint.resolve())
    assert (stage_dir / "model" / "model.safetensors").is_file() and not (stage_dir / "adapter").exists()
    ours = stage_reference(stage_dir).set_index("id")
    trl = stage_reference(native.path).set_index("id").loc[ours.index]
    assert np.allclose(ours["ref_chosen_logps"], trl["ref_chosen_logps"], atol=1e-4)
    assert np.allclose(ours["ref_rejected_logps"], trl["ref_rejected_logps"], atol=1e-4)
    for column in ("prompt_tokens", "chosen_tokens", "rejected_tokens", "truncated"):
        assert (ours[column] == trl[column]).all(), column
    assert cli(args) == 0 and f"--stage {key}" in capsys.readouterr().out  # the same import: a cache hit

    a = pd.read_parquet(attribute(native.path.parents[1], native.path, EchoProbe(), methods=["gradsim"])
                        .file("scores.parquet")).set_index("pair_id")
    b = pd.read_parquet(attribute(run, key, EchoProbe(), methods=["gradsim"]).file("scores.parquet")
                        ).set_index("pair_id").loc[a.index]
    assert np.abs(a["loss"] - np.log(2)).max() > 1e-3  # training moved the policy off the reference
    assert np.allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-5)
    for column in ("score_gradsim_dot", "score_gradsim_layer_cosine", "score_margin"):
        assert np.allclose(b[column], a[column], rtol=1e-4, atol=1e-7), column
    assert (b["rank"] == a["rank"]).all()


def _other_shape(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model with a third block: same tokenizer, parameters the checkpoint does not have."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    out = tmp_path / "three-blocks"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _full_case(case: str, checkpoint: Path, adapter_dir: Path, tmp_path: Path, tiny_model_dir: Path):
    """(model, trained-weights flags, message) of one bad full-checkpoint import."""
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    if case == "pickled":
        (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
        return tiny_model_dir, ["--checkpoint", str(copy)], "pytorch_model.bin"
    if case == "adapter as checkpoint":
        return tiny_model_dir, ["--checkpoint", str(adapter_dir)], "holds a PEFT adapter; import it with --adapter"
    if case == "both":
        return tiny_model_dir, ["--checkpoint", str(copy), "--adapter", str(adapter_dir)], "exactly one of"
    if case == "neither":
        return tiny_model_dir, [], "exactly one of"
    return _other_shape(tmp_path, tiny_model_dir), ["--checkpoint", str(copy)], "does not fit model"


@pytest.mark.parametrize("case", ["pickled", "adapter as checkpoint", "both", "neither", "other base"])
def test_bad_full_imports_are_one_line_and_write_nothing(external_full, external, tiny_model_dir, tmp_path, capsys,
                                                         case):
    _, checkpoint, data, config = external_full
    model, flags, message = _full_case(case, checkpoint, external[1], tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    assert cli(["import-stage", "--model", str(model), *flags, "--data", str(data), "--config", str(config),
                "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = _without_progress_bars(err)
    assert len(lines) == 1 and lines[0].startswith("alignscope: error: ") and message in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_a_config_saying_lora_for_a_full_checkpoint_is_refused(external_full, tiny_model_dir, tmp_path):
    from alignscope.align.imported import import_stage

    _, checkpoint, data, _ = external_full
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump({**OBJECTIVE, "finetune": "lora"}))
    with pytest.raises(InputError, match="finetune: lora, but --checkpoint"):
        import_stage(str(tiny_model_dir), None, data, tmp_path / "run", config=config, checkpoint=checkpoint)


def test_loading_a_model_whose_weights_are_only_a_pickle_is_refused(tiny_model_dir, tmp_path):
    """`models.load` (audit --model, align --model) never unpickles a checkpoint's weights."""
    from alignscope.models import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"weights are a pickle \(pytorch_model.bin\)"):
        load(str(copy))


# --------------------------------------------------------------------------- TracIn snapshots from TRL checkpoints


def test_trl_checkpoints_become_tracin_snapshots(tiny_model_dir, tmp_path, capsys):
    """A TRL run's checkpoint-<k> directories, passed with --snapshot, give TracIn its adapters and the
    learning rate each next update used (read from trainer_state.json)."""
    from alignscope.store import file_hash

    data, config = _plain_trl_dpo_run(tiny_model_dir, tmp_path, save_strategy="steps", save_steps=1,
                                      lr_scheduler_type="linear")
    run = tmp_path / "run"
    checkpoints = [tmp_path / "trl" / f"checkpoint-{k}" for k in (2, 1)]  # any order
    assert cli(["import-stage", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                "--data", str(data), "--config", str(config), "--out", str(run),
                *[arg for c in checkpoints for arg in ("--snapshot", str(c))]]) == 0
    key = capsys.readouterr().out.split("--stage ")[1].split()[0]
    snapshots = run / "align" / key / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-1", "step-2"]
    # linear decay from 3e-3 over 2 steps: the update after checkpoint 1 (update 2) used 1.5e-3, read from
    # checkpoint 2's log; none followed checkpoint 2
    assert json.loads((snapshots / "step-1" / "snapshot.json").read_text()) == \
        {"step": 1, "learning_rate": 1.5e-3, "rate_logged_at": 2}
    assert json.loads((snapshots / "step-2" / "snapshot.json").read_text())["learning_rate"] == 0.0
    assert file_hash(snapshots / "step-1" / "adapter_model.safetensors") == \
        file_hash(checkpoints[1] / "adapter_model.safetensors")
    assert sorted(p.name for p in (snapshots / "step-1").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors", "snapshot.json"]
    artefact = attribute(run, key, EchoProbe(), methods=["tracin"])
    scores = pd.read_parquet(artefact.file("scores.parquet"))
    assert np.abs(scores["score_tracin"]).max() > 0


def _with_state(adapter: Path, tmp_path: Path, name: str, state: dict, **fields) -> Path:
    copy = _broken(adapter, tmp_path / name, _set(**fields) if fields else (lambda p: None))
    (copy / "trainer_state.json").write_text(json.dumps(state))
    return copy


@pytest.mark.parametrize(("case", "message"), [
    ("other lora", "its LoRA settings differ from --adapter's"),
    ("no rate at its step", "logs no learning rate at step 3 or 4"),
    ("no trainer state", "no readable trainer_state.json"),
    ("same step twice", "two checkpoints are at the same step"),
    ("full checkpoint", "TracIn snapshots are LoRA adapters"),
])
def test_bad_snapshots_are_refused(external, external_full, tiny_model_dir, tmp_path, case, message):
    from alignscope.align.imported import import_stage

    _, adapter, data, config = external
    good = {"global_step": 3, "max_steps": 9, "log_history": [{"step": 3, "learning_rate": 1e-3}]}
    kwargs = {"config": config}
    if case == "other lora":
        snaps = [_with_state(adapter, tmp_path, "a", good, r=2)]
    elif case == "no rate at its step":
        snaps = [_with_state(adapter, tmp_path, "a", {"global_step": 3, "max_steps": 9,
                                                      "log_history": [{"step": 2, "learning_rate": 1.0}]})]
    elif case == "no trainer state":
        snaps = [adapter]
    elif case == "same step twice":
        snaps = [_with_state(adapter, tmp_path, "a", good), _with_state(adapter, tmp_path, "b", good)]
    else:
        snaps = [_with_state(adapter, tmp_path, "a", good)]
        kwargs["checkpoint"] = external_full[1]
    trained = None if case == "full checkpoint" else adapter
    with pytest.raises(InputError, match=message):
        import_stage(str(tiny_model_dir), trained, data, tmp_path / "run", snapshots=snaps, **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_next_rate_was_not_logged_uses_its_own_and_says_so(external, tmp_path):
    from alignscope.align.imported import adapter_lora_settings, tracin_snapshots

    _, adapter, _, _ = external
    state = {"global_step": 3, "max_steps": 9, "log_history": [{"step": 3, "learning_rate": 1e-3}]}
    [snap] = tracin_snapshots([_with_state(adapter, tmp_path, "a", state)], adapter_lora_settings(adapter))
    assert (snap["step"], snap["learning_rate"], snap["rate_logged_at"]) == (3, 1e-3, 3)
    state["log_history"].append({"step": 4, "learning_rate": 8e-4})  # the next update's rate wins when logged
    [snap] = tracin_snapshots([_with_state(adapter, tmp_path, "b", state)], adapter_lora_settings(adapter))
    assert (snap["learning_rate"], snap["rate_logged_at"]) == (8e-4, 4)
