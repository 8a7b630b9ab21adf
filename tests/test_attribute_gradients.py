"""Attribution core on the tiny Llama: TRL-identical tokenisation (reference log-probs reproduce the
stage's cache), batched per-example gradients equal a per-example loop, the measurement equals the
engine's numbers, projection preserves dot products, collection resumes part-way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignscope.align import StageConfig, StageResult, stage_reference, train_stage
from alignscope.attribute.estimators import loss_rows
from alignscope.attribute.gradients import (
    WeightGradients,
    check_layers,
    collect_pair_gradients,
    measurement_gradients,
    reference_logprobs,
)
from alignscope.attribute.objective import LogProbModel, encode_pair, objective_from_summary
from alignscope.data.preferences import PreferencePair
from alignscope.errors import InputError
from alignscope.models.engine import Engine
from alignscope.models.requests import ScoreRequest
from alignscope.store import RunDir

SYSTEM = {"role": "system", "content": "Be brief."}
TOPICS = ["tea", "rain", "maps", "bread", "chess", "moss", "kites", "owls", "jazz", "salt"]


def pairs(n: int = 6) -> list[PreferencePair]:
    return [PreferencePair(id=f"p{i}", prompt=(SYSTEM, {"role": "user", "content": f"Tell me about {TOPICS[i]}."}),
                           chosen="Sure thing." if i % 2 else f"{TOPICS[i].title()} is fine.",
                           rejected=f"No, {TOPICS[i]} is dull and I will not talk about it.")
            for i in range(n)]


def stage(method: str = "dpo", **kw) -> StageConfig:
    base = dict(method=method, max_steps=2, per_device_train_batch_size=2, max_length=40, dtype="float32",
                learning_rate=5e-3, save_steps=50, precompute_ref_batch_size=3)
    base.update(kw)
    return StageConfig(**base)


@pytest.fixture(scope="module")
def dpo_stage(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("attr-dpo")
    data = pairs(6)
    result = train_stage(str(tiny_model_dir), stage(beta=0.5), data, run)
    return run, data, result


def loaded(result: StageResult):
    lm = result.load(dtype="float32", device="cpu")
    lm.model.eval()
    return lm


def test_stage_keeps_its_pairs(dpo_stage):
    from alignscope.data.preferences import load_preferences

    _, data, result = dpo_stage
    back = load_preferences(result.path / "pairs.parquet")
    assert [p.to_dict() for p in back] == [p.to_dict() for p in data]


def test_reference_logprobs_reproduce_the_stage_cache(dpo_stage):
    """Policy log-probs with the adapter disabled == TRL's cached reference (tokenisation matches TRL)."""
    _, data, result = dpo_stage
    lm = loaded(result)
    objective = objective_from_summary(result.summary)
    rows = {s: [] for s in objective.sides}
    for p in data:
        for s, row in zip(objective.sides, encode_pair(lm.tokenizer, p, objective.sides, 40, "keep_start")):
            rows[s].append(row)
    ours = reference_logprobs(LogProbModel(lm.model, lm.tokenizer.pad_token_id), rows, 4096)
    cache = stage_reference(result.path).set_index("id").loc[[p.id for p in data]]
    assert ours["chosen"] == pytest.approx(cache["ref_chosen_logps"].to_numpy(), abs=1e-4)
    assert ours["rejected"] == pytest.approx(cache["ref_rejected_logps"].to_numpy(), abs=1e-4)
    # and the trained adapter does change them (so the check above is not vacuous)
    with torch.no_grad():
        policy = LogProbModel(lm.model, lm.tokenizer.pad_token_id)(rows["chosen"]).numpy()
    assert np.abs(policy - ours["chosen"]).max() > 1e-3


def loop_gradient(lm, objective, pair, ref_c, ref_r):
    """The slow reference: one pair's loss, autograd w.r.t. every LoRA weight, flattened in order."""
    from alignscope.attribute.gradients import trained_linears

    lp = LogProbModel(lm.model, lm.tokenizer.pad_token_id)
    weights = [m.weight for _, m in trained_linears(lm.model)]
    for w in weights:
        w.requires_grad_(True)
    rows = encode_pair(lm.tokenizer, pair, objective.sides, 40, "keep_start")
    s = {side: lp([row]) for side, row in zip(objective.sides, rows)}
    n = {side: torch.tensor([float(row.n_scored)]) for side, row in zip(objective.sides, rows)}
    ref = {"chosen": torch.tensor([ref_c]), "rejected": torch.tensor([ref_r])}
    loss = objective.loss_fn(s, n, ref).sum()
    grads = torch.autograd.grad(loss, weights)
    return torch.cat([g.reshape(-1) for g in grads]).double().numpy(), float(loss.detach())


@pytest.mark.parametrize("method", ["dpo", "sft", "dpo-full"])
def test_batched_gradients_equal_a_per_example_loop(dpo_stage, tiny_model_dir, tmp_path, method):
    run_dir, data, result = dpo_stage
    if method == "sft":
        result = train_stage(str(tiny_model_dir), stage("sft"), data, run_dir)
    if method == "dpo-full":  # no adapter: the gradients are the blocks' own weight matrices
        result = train_stage(str(tiny_model_dir), stage(beta=0.5, finetune="full"), data, run_dir)
    lm = loaded(result)
    objective = objective_from_summary(result.summary)
    ref = stage_reference(result.path) if objective.needs_reference else None
    gs = collect_pair_gradients(lm, data, objective, run=RunDir(tmp_path), inputs={"t": method},
                                max_length=40, truncation_mode="keep_start", reference=ref, project_dim=None,
                                seed=0, batch_tokens=90, chunk_pairs=4)
    batched = loss_rows(gs, slice(0, len(data)))
    assert np.abs(batched).max() > 1e-3
    refs = ref.set_index("id") if ref is not None else None
    for i, p in enumerate(data):
        rc, rr = (float(refs.loc[p.id, "ref_chosen_logps"]), float(refs.loc[p.id, "ref_rejected_logps"])) \
            if refs is not None else (0.0, 0.0)
        expected, loss = loop_gradient(lm, objective, p, rc, rr)
        assert batched[i] == pytest.approx(expected, abs=1e-5, rel=1e-4)
        assert gs.table.loc[i, "loss"] == pytest.approx(loss, abs=1e-5)
    if method == "dpo-full":  # 2 blocks × (q, k, v, o, gate, up, down), never the head
        assert len(gs.layers) == 2 * 7 and not any("lm_head" in layer.name for layer in gs.layers)
    else:  # every LoRA weight (A and B of each adapted module) got a gradient somewhere
        assert len(gs.layers) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)


def token_factor_sums(lm, data, objective) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The slow reference for the K-FAC sums: each side row alone, autograd to every LoRA linear's
    output, Σ x xᵀ and Σ g gᵀ over the tokens whose output gradient is non-zero."""
    from alignscope.attribute.gradients import trained_linears

    lp = LogProbModel(lm.model, lm.tokenizer.pad_token_id)
    modules = trained_linears(lm.model)
    sums = {name: (torch.zeros(m.weight.shape[1], m.weight.shape[1], dtype=torch.float64),
                   torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64)) for name, m in modules}
    for pair in data:
        for row in encode_pair(lm.tokenizer, pair, objective.sides, 40, "keep_start"):
            seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, (inp[0], out)))
                     for name, m in modules]
            value = lp([row], input_hook=lambda e: e.detach().requires_grad_(True))
            for h in hooks:
                h.remove()
            outs = torch.autograd.grad(value.sum(), [seen[name][1] for name, _ in modules])
            for (name, _), g in zip(modules, outs):
                x, g = seen[name][0][0].detach().double(), g[0].double()
                keep = g.abs().amax(dim=-1) > 0
                sums[name][0].add_(x[keep].T @ x[keep])
                sums[name][1].add_(g[keep].T @ g[keep])
    return sums


def test_kfac_sums_collected_with_the_gradients_equal_a_per_row_loop(dpo_stage, tmp_path):
    _, data, result = dpo_stage
    lm = loaded(result)
    objective = objective_from_summary(result.summary)
    gs = collect_pair_gradients(lm, data, objective, run=RunDir(tmp_path), inputs={"t": "factors"}, max_length=40,
                                truncation_mode="keep_start", reference=stage_reference(result.path),
                                project_dim=None, seed=0, batch_tokens=90, chunk_pairs=4, factors=True)
    factors = gs.factors()
    expected = token_factor_sums(lm, data, objective)
    assert len(factors) == len(gs.layers)
    for layer, (a, s) in zip(gs.layers, factors):
        want_a, want_s = expected[layer.name]
        assert np.abs(want_a.numpy()).max() > 0 and np.abs(want_s.numpy()).max() > 0, layer.name
        for got, want in ((a, want_a.numpy()), (s, want_s.numpy())):  # float32 products, float64 sums
            assert got == pytest.approx(want, abs=1e-4 * np.abs(want).max()), layer.name


def test_measurement_equals_the_engine(dpo_stage):
    _, _, result = dpo_stage
    lm = loaded(result)
    requests = [ScoreRequest("Tell me about tea.", " Sure thing.", chat=True),
                ScoreRequest("Tell me about tea.", "No, tea is dull.", chat=True),
                ScoreRequest("The sky is", " blue", chat=False)]
    weights = [1.0, -1.0, 0.5]
    grads = WeightGradients(lm.model)
    logps, rows = measurement_gradients(lm, grads, requests, weights, batch_tokens=32)
    engine = Engine(lm, cache=None, progress=False)
    expected = [r.logprob for r in engine.score(requests)]
    assert logps == pytest.approx(expected, abs=1e-4)
    assert float(np.dot(weights, logps)) == pytest.approx(float(np.dot(weights, expected)), abs=1e-4)
    # attribution keeps only ∇f (a measurement can have thousands of requests): summed batch by batch,
    # it must equal the weighted rows added up
    again, total = measurement_gradients(lm, grads, requests, weights, batch_tokens=32, summed=True)
    assert total.shape == (rows.shape[1],) and np.abs(total).max() > 0 and again == pytest.approx(logps)
    assert total == pytest.approx(rows.astype(np.float64).sum(axis=0), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("layers", ["last:1", "last:50%"])
def test_a_layer_selection_gives_the_same_gradients_for_its_blocks(dpo_stage, tmp_path, layers):
    """The backward that stops at the first selected block gives those blocks' weights exactly the
    gradients of the full backward (pairs and measurement), and nothing for the blocks before."""
    _, data, result = dpo_stage
    lm = loaded(result)
    objective = objective_from_summary(result.summary)
    kw = dict(objective=objective, max_length=40, truncation_mode="keep_start", reference=stage_reference(result.path),
              project_dim=None, seed=0, batch_tokens=90, chunk_pairs=4)
    whole = collect_pair_gradients(lm, data, run=RunDir(tmp_path), inputs={"t": "all"}, **kw)
    part = collect_pair_gradients(lm, data, run=RunDir(tmp_path), inputs={"t": layers}, layers=layers, **kw)
    names = [layer.name for layer in part.layers]
    assert names and all(".layers.1." in name for name in names)  # the tiny Llama's last of 2 blocks
    by_name = {layer.name: layer for layer in whole.layers}
    columns = np.concatenate([np.arange(by_name[n].offset, by_name[n].offset + by_name[n].size) for n in names])
    for side in objective.sides:
        assert np.abs(np.asarray(part.side(side))).max() > 1e-4
        assert np.asarray(part.side(side)) == pytest.approx(np.asarray(whole.side(side))[:, columns], abs=1e-5)
    assert part.table["loss"].tolist() == pytest.approx(whole.table["loss"].tolist(), abs=1e-6)
    req = [ScoreRequest("Tell me about tea.", " Sure thing.", chat=True)]
    full = measurement_gradients(lm, WeightGradients(lm.model), req, [1.0])[1]
    sub = measurement_gradients(lm, WeightGradients(lm.model, layers=layers), req, [1.0])[1]
    assert sub == pytest.approx(full[:, columns], abs=1e-5)


@pytest.mark.parametrize("spec", ["first:2", "last:0", "last:101%", "last:x", "2"])
def test_a_malformed_layer_selection_is_refused_in_one_line(spec):
    with pytest.raises(InputError, match="use all, last:N"):
        check_layers(spec)


def test_a_selection_larger_than_the_model_names_its_block_count(dpo_stage):
    lm = loaded(dpo_stage[2])
    assert check_layers(" Last:3 ") == "last:3"
    with pytest.raises(InputError, match="2 LoRA-adapted blocks"):
        WeightGradients(lm.model, layers="last:3")


def test_projection_keeps_dot_products_roughly(dpo_stage):
    _, data, result = dpo_stage
    lm = loaded(result)
    req = [ScoreRequest("Tell me about tea.", " Sure thing.", chat=True),
           ScoreRequest("Tell me about rain.", " No.", chat=True)]
    full = measurement_gradients(lm, WeightGradients(lm.model), req, [1.0, 1.0])[1].astype(np.float64)
    exact = float(full[0] @ full[1])
    estimates = []
    for seed in range(8):
        proj = WeightGradients(lm.model, project_dim=64, seed=seed)
        g = measurement_gradients(lm, proj, req, [1.0, 1.0])[1].astype(np.float64)
        assert g.shape[1] <= 64
        estimates.append(float(g[0] @ g[1]))
    assert np.sign(np.mean(estimates)) == np.sign(exact)
    again = measurement_gradients(lm, WeightGradients(lm.model, project_dim=64, seed=3), req, [1.0, 1.0])[1]
    assert float(again[0].astype(np.float64) @ again[1]) == pytest.approx(estimates[3], rel=1e-5)  # seeded


def test_collection_resumes_part_way(dpo_stage, tmp_path):
    _, data, result = dpo_stage
    lm = loaded(result)
    objective = objective_from_summary(result.summary)
    ref = stage_reference(result.path)
    kw = dict(objective=objective, inputs={"t": "resume"}, max_length=40, truncation_mode="keep_start",
              reference=ref, project_dim=32, seed=0, chunk_pairs=2, factors=True)
    done: list[int] = []

    def stop_after_first(chunk: int) -> None:
        done.append(chunk)
        if len(done) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_pair_gradients(lm, data, run=RunDir(tmp_path / "a"), after_chunk=stop_after_first, **kw)
    assert RunDir(tmp_path / "a").find("gradients", {"t": "resume"}) is None
    resumed = collect_pair_gradients(lm, data, run=RunDir(tmp_path / "a"), after_chunk=done.append, **kw)
    assert done == [0, 1, 2]  # chunk 0 was not recomputed
    whole = collect_pair_gradients(lm, data, run=RunDir(tmp_path / "b"), **kw)
    assert np.asarray(resumed.side("chosen")) == pytest.approx(np.asarray(whole.side("chosen")), abs=1e-6)
    assert resumed.table["loss"].tolist() == pytest.approx(whole.table["loss"].tolist(), abs=1e-6)
    for (a1, s1), (a2, s2) in zip(resumed.factors(), whole.factors()):  # K-FAC sums: no chunk twice or lost
        assert a1 == pytest.approx(a2, rel=1e-6, abs=1e-9) and s1 == pytest.approx(s2, rel=1e-6, abs=1e-12)


def test_unsupported_method_is_named():
    summary = {"method": "rloo", "config": {"method": "rloo"}}
    with pytest.raises(InputError, match="rloo"):
        objective_from_summary(summary)

