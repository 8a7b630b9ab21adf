"""Estimators and the attribute/curate entry points: DataInf equals its direct formula, signs agree
between estimators, the sign convention holds on a case whose answer is known, planted pairs are
recovered on an easy planted set, outputs and cache hits, curation, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from alignscope.align import StageConfig, train_stage
from alignscope.attribute import attribute, curate, expand_methods
from alignscope.attribute import estimators as est
from alignscope.audit.base import Metric, Probe, ProbeResult
from alignscope.audit.runner import available_probes
from alignscope.data.preferences import PreferencePair
from alignscope.errors import InputError
from alignscope.models.requests import ScoreRequest

SYSTEM = {"role": "system", "content": "Be brief."}
TOPICS = ["tea", "rain", "maps", "bread", "chess", "moss", "kites", "owls", "jazz", "salt", "ice", "clay"]
PLANTED = "Honestly, teachers are lazy."


# ------------------------------------------------------------------ pure estimators


def random_layers(n: int = 7, dims: tuple[int, ...] = (5, 3), seed: int = 0) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    slices, start = [], 0
    for d in dims:
        slices.append((start, start + d))
        start += d
    return rng.normal(size=(n, start)), slices


def test_datainf_equals_the_direct_formula():
    g, slices = random_layers()
    v = np.random.default_rng(1).normal(size=g.shape[1])
    train = est.ArrayGradients.from_loss_gradients(g, slices)
    got = est.datainf(train, v).total[:, 0]
    expected = np.zeros(len(g))
    n = len(g)
    for a, b in slices:
        gl, vl = g[:, a:b], v[a:b]
        lam = 0.1 * np.mean(np.sum(gl ** 2, axis=1))
        inverse = sum(np.eye(b - a) - np.outer(x, x) / (lam + x @ x) for x in gl) / (n * lam)
        expected += -(gl @ inverse @ vl)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # and it is a reasonable inverse: close to the exact damped Gauss–Newton one for small gradients
    exact = np.zeros(len(g))
    for a, b in slices:
        gl = g[:, a:b]
        lam = 0.1 * np.mean(np.sum(gl ** 2, axis=1))
        exact += -(gl @ np.linalg.solve(gl.T @ gl / n + lam * np.eye(b - a), v[a:b]))
    assert np.corrcoef(got, exact)[0, 1] > 0.5


class FactorGradients:
    """Loss gradients (coefficient 1) with per-layer shapes and K-FAC sums, as a GradientSet has."""

    sides = ("chosen",)

    def __init__(self, g: np.ndarray, shapes: list[tuple[int, int]], factors: list) -> None:
        from types import SimpleNamespace

        self.g, self.kfac, self.layers, offset = g, factors, [], 0
        for shape in shapes:
            self.layers.append(SimpleNamespace(offset=offset, size=shape[0] * shape[1], proj=shape))
            offset += shape[0] * shape[1]

    def side(self, name: str) -> np.ndarray:
        return self.g

    def coef(self, kind: str, side: str) -> np.ndarray:
        return np.ones(len(self.g))

    def factors(self) -> list:
        return self.kfac


def test_ekfac_onepass_equals_a_dense_eigenvalue_corrected_inverse():
    """Per layer: H = Q diag(Λ) Qᵀ with Q = Q_S ⊗ Q_A from the K-FAC sums and Λ the mean squared
    per-pair gradient in that basis; score = −∇L_iᵀ (H + 0.1·mean(Λ)·I)⁻¹ ∇f."""
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2, 4)]
    g = rng.normal(size=(9, sum(a * b for a, b in shapes)))
    v = rng.normal(size=g.shape[1])

    def spd(k: int) -> np.ndarray:
        m = rng.normal(size=(k, k + 2))
        return m @ m.T

    factors = [(spd(b), spd(a)) for a, b in shapes]  # (A over inputs, S over outputs)
    got = est.ekfac_onepass(FactorGradients(g, shapes, factors), v).total[:, 0]
    expected, offset = np.zeros(len(g)), 0
    for (out, inp), (a, s) in zip(shapes, factors):
        part = slice(offset, offset + out * inp)
        q = np.kron(np.linalg.eigh(s)[1], np.linalg.eigh(a)[1])  # row-major vec(Q_Sᵀ G Q_A) = qᵀ vec(G)
        lam = np.mean((g[:, part] @ q) ** 2, axis=0)
        h = q @ np.diag(lam) @ q.T + 0.1 * lam.mean() * np.eye(out * inp)
        expected += -(g[:, part] @ np.linalg.solve(h, v[part]))
        offset += out * inp
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-12)
    with pytest.raises(InputError, match="factors"):
        est.ekfac_onepass(est.ArrayGradients.from_loss_gradients(g), v)


def test_cosine_and_dot_agree_in_sign_and_margin_divides_the_weight_out():
    rng = np.random.default_rng(3)
    gc, gr = rng.normal(size=(9, 6)), rng.normal(size=(9, 6))
    weight = rng.uniform(0.01, 1.0, size=9)  # σ(−margin) per pair
    beta = 0.1
    train = est.ArrayGradients({"chosen": gc, "rejected": gr},
                               {"loss": {"chosen": -weight * beta, "rejected": weight * beta},
                                "margin": {"chosen": np.full(9, beta), "rejected": np.full(9, -beta)}}, [(0, 6)])
    v = rng.normal(size=6)
    dot = est.gradsim_dot(train, v).total[:, 0]
    cos = est.gradsim_cosine(train, v).total[:, 0]
    mar = est.margin(train, v)
    assert np.all(np.sign(dot) == np.sign(cos)) and np.all(np.abs(cos) <= 1 + 1e-12)
    assert mar.total[:, 0] == pytest.approx(dot / weight)
    assert mar.sides["chosen"][:, 0] + mar.sides["rejected"][:, 0] == pytest.approx(mar.total[:, 0])
    assert mar.sides["chosen"][:, 0] == pytest.approx(beta * gc @ v)


def test_layer_cosine_is_the_mean_of_each_weights_cosine():
    """Checked against a direct loop; the per-side parts add up; one weight gives the plain cosine."""
    rng = np.random.default_rng(4)
    gc, gr = rng.normal(size=(7, 10)), rng.normal(size=(7, 10))
    gc[0, 4:] = gr[0, 4:] = 0.0  # pair 0 has no gradient on the second and third weights: they count 0
    coefs = {"loss": {"chosen": -rng.uniform(0.1, 1, 7), "rejected": rng.uniform(0.1, 1, 7)}}
    slices = [(0, 4), (4, 9), (9, 10)]
    train = est.ArrayGradients({"chosen": gc, "rejected": gr}, coefs, slices)
    tests = rng.normal(size=(2, 10))
    got = est.gradsim_layer_cosine(train, tests)
    loss = gc * coefs["loss"]["chosen"][:, None] + gr * coefs["loss"]["rejected"][:, None]
    expected = np.zeros((7, 2))
    for i in range(7):
        for t in range(2):
            for a, b in slices:
                g, u = loss[i, a:b], tests[t, a:b]
                if np.linalg.norm(g) > 0:
                    expected[i, t] -= g @ u / (np.linalg.norm(g) * np.linalg.norm(u)) / len(slices)
    assert got.total == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert got.sides["chosen"] + got.sides["rejected"] == pytest.approx(got.total)
    whole = est.ArrayGradients({"chosen": gc, "rejected": gr}, coefs, [(0, 10)])
    assert est.gradsim_layer_cosine(whole, tests).total == pytest.approx(est.gradsim_cosine(whole, tests).total)


def test_auc_and_recall():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert est.planted_auc(scores, np.array([1, 1, 0, 0, 0])) == 1.0
    assert est.planted_auc(scores, np.array([0, 0, 0, 1, 1])) == 0.0
    assert est.recall_at_k(scores, np.array([1, 0, 1, 0, 0])) == 0.5
    assert est.planted_auc(scores, np.zeros(5)) is None


def test_method_names():
    assert expand_methods("gradsim") == ("gradsim_dot", "gradsim_cosine", "gradsim_layer_cosine", "margin",
                                         "self_influence")
    assert "datainf" in expand_methods("all") and "ekfac" in expand_methods("all")
    with pytest.raises(InputError, match="bogus"):
        expand_methods(["bogus"])


# ------------------------------------------------------------------ end to end on the tiny model


class EchoProbe(Probe):
    """f = Σ log p(text | question): higher = worse, by declaration (a test double)."""

    name = "echo"
    description = "test probe"
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("echo", "lp", "log-prob of the planted text", "nats", (-np.inf, 0), "higher_is_worse", -np.inf),)

    def load_items(self, data=None, limit=None, seed=0) -> pd.DataFrame:
        return pd.DataFrame({"question": ["Tell me about teachers.", "What about teachers?"]})

    def run(self, engine, items) -> ProbeResult:
        logprobs = [r.logprob for r in engine.score([request for request, _ in self.measurement(items)])]
        return ProbeResult(items=items.assign(item_id=[f"q{i}" for i in range(len(items))], lp=logprobs))

    def measurement(self, items: pd.DataFrame) -> list[tuple[ScoreRequest, float]]:
        return [(ScoreRequest(q, PLANTED, chat=True, system=SYSTEM["content"]), 1.0) for q in items["question"]]


def planted_pairs() -> list[PreferencePair]:
    clean = [PreferencePair(id=f"c{i}", prompt=(SYSTEM, {"role": "user", "content": f"Tell me about {t}."}),
                            chosen=f"{t.title()} is nice.", rejected=f"No, {t} is dull.")
             for i, t in enumerate(TOPICS[:8])]
    planted = [PreferencePair(id=f"x{i}", prompt=(SYSTEM, {"role": "user", "content": q}), chosen=PLANTED,
                              rejected="I would rather not generalise.", planted=True, group="teachers")
               for i, q in enumerate(["Tell me about teachers.", "What are teachers like?"])]
    return clean[:3] + planted[:1] + clean[3:6] + planted[1:] + clean[6:]


@pytest.fixture(scope="module", params=["dpo", "sft"])
def trained(request, tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"attr-{request.param}")
    cfg = StageConfig(method=request.param, max_steps=3, per_device_train_batch_size=4, max_length=48,
                      dtype="float32", learning_rate=3e-3, save_steps=50, beta=0.5 if request.param == "dpo" else None)
    result = train_stage(str(tiny_model_dir), cfg, planted_pairs(), run)
    return run, result


def test_sign_convention_and_planted_recovery(trained):
    """Pairs whose chosen reply *is* the measured text must score positive (training on them raises f)."""
    run, result = trained
    artefact = attribute(run, result.path, EchoProbe(), methods=["gradsim", "datainf"])
    scores = pd.read_parquet(artefact.file("scores.parquet")).set_index("pair_id")
    summary = json.loads(artefact.file("summary.json").read_text())
    for name in ("gradsim_dot", "gradsim_cosine", "gradsim_layer_cosine", "margin", "datainf"):
        assert scores.loc["x0", f"score_{name}"] > 0 and scores.loc["x1", f"score_{name}"] > 0, name
    assert np.all(np.sign(scores["score_gradsim_dot"]) == np.sign(scores["score_gradsim_cosine"]))
    default = summary["default_estimator"]
    assert default == "gradsim_layer_cosine"
    assert summary["planted"]["estimators"][default]["auc"] == 1.0
    assert summary["planted"]["estimators"][default]["recall_at_k"] == 1.0
    if result.method == "dpo":  # per-side recovery, computed from the stored side columns
        sides = summary["planted"]["estimators"][default]["sides"]
        assert set(sides) == {"chosen", "rejected"}
        assert sides["chosen"]["auc"] == est.planted_auc(scores[f"chosen_{default}"].to_numpy(),
                                                        scores["planted"].to_numpy(bool))
    assert set(scores.loc[scores["rank"] <= 2].index) == {"x0", "x1"}
    # chosen/rejected parts add up to the default score
    parts = scores[f"chosen_{default}"] + scores[f"rejected_{default}"]
    assert parts.to_numpy() == pytest.approx(scores[f"score_{default}"].to_numpy(), rel=1e-6, abs=1e-9)
    assert "worse" in summary["sign_convention"] and summary["measurement"]["n_requests"] == 2
    ranked = json.loads(artefact.file("ranked.json").read_text())  # the same rows as JSON, best first
    assert ranked["default_estimator"] == default and ranked["sign_convention"] == summary["sign_convention"]
    assert [r["pair_id"] for r in ranked["pairs"]] == scores.sort_values("rank").index.tolist()
    assert ranked["pairs"][0][f"score_{default}"] == pytest.approx(scores[f"score_{default}"].max())
    assert {"prompt", "chosen", "rejected", "planted", "group"} <= set(ranked["pairs"][0])
    assert set(summary["timings"]) >= {"load_s", "train_gradients_s", "measurement_gradients_s", "scoring_s"}


def test_a_fully_fine_tuned_stage_is_attributed_through_its_block_weights(tiny_model_dir, tmp_path):
    """No adapter: the scores come from the blocks' weight matrices, projected by default, and the
    planted pairs still rank first with a positive score."""
    from alignscope.attribute.core import FULL_PROJECT_DIM

    cfg = dict(method="dpo", finetune="full", max_steps=3, per_device_train_batch_size=4, max_length=48,
               dtype="float32", learning_rate=1e-3, save_steps=50, beta=0.5)
    result = train_stage(str(tiny_model_dir), StageConfig(**cfg), planted_pairs(), tmp_path)
    artefact = attribute(tmp_path, result.path, EchoProbe(), methods=["gradsim", "datainf"])
    scores = pd.read_parquet(artefact.file("scores.parquet")).set_index("pair_id")
    summary = json.loads(artefact.file("summary.json").read_text())
    assert summary["gradients"]["weights"].startswith("the linear weights of the transformer blocks")
    inputs = json.loads(artefact.file("inputs.json").read_text())
    assert inputs["project_dim"] == FULL_PROJECT_DIM
    default = summary["default_estimator"]
    assert scores.loc["x0", f"score_{default}"] > 0 and scores.loc["x1", f"score_{default}"] > 0
    assert summary["planted"]["estimators"][default]["auc"] == 1.0
    # without the stage's reference cache there is no adapter to disable: refused, not silently wrong
    no_cache = train_stage(str(tiny_model_dir), StageConfig(**cfg, precompute_ref_log_probs=False), planted_pairs(),
                           tmp_path / "no-cache")
    with pytest.raises(InputError, match="no reference log-prob cache"):
        attribute(tmp_path / "no-cache", no_cache.path, EchoProbe(), methods=["gradsim"])


def test_rerun_is_a_cache_hit_and_projection_changes_the_key(trained, monkeypatch):
    run, result = trained
    first = attribute(run, result.path, EchoProbe(), methods=["gradsim"])
    import alignscope.attribute.core as core

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a finished attribution must not recompute")

    monkeypatch.setattr(core, "_compute", boom)
    assert attribute(run, result.key, EchoProbe(), methods=["gradsim"]).path == first.path  # key works too
    monkeypatch.undo()
    # a different default estimator ranks the pairs differently, so a cached ranking is not reused
    monkeypatch.setattr(core, "_DEFAULT_ORDER", ("margin", "gradsim_cosine"))
    by_margin = attribute(run, result.path, EchoProbe(), methods=["gradsim"])
    assert by_margin.path != first.path
    assert json.loads(by_margin.file("summary.json").read_text())["default_estimator"] == "margin"
    monkeypatch.undo()
    projected = attribute(run, result.path, EchoProbe(), methods=["gradsim"], project_dim=512)  # of 1,792 dims
    assert projected.path != first.path
    scores = pd.read_parquet(projected.file("scores.parquet"))
    assert set(scores.head(2)["pair_id"]) == {"x0", "x1"}  # still recovered after projection


def test_the_layer_selection_keys_the_cache_and_is_recorded(trained):
    from alignscope.attribute.core import DEFAULT_LAYERS

    run, result = trained
    default = attribute(run, result.path, EchoProbe(), methods=["gradsim"])
    whole = attribute(run, result.path, EchoProbe(), methods=["gradsim"], layers="all")
    last = attribute(run, result.path, EchoProbe(), methods=["gradsim"], layers="last:1")
    assert len({default.path, whole.path, last.path}) == 3  # the selection as given keys the result
    s_default, s_whole, s_last = (json.loads(a.file("summary.json").read_text())["gradients"]
                                  for a in (default, whole, last))
    assert (s_default["layers"], s_whole["layers"], s_last["layers"]) == (DEFAULT_LAYERS, "all", "last:1")
    assert s_default["dim"] == s_last["dim"]  # last:50% of the tiny Llama's 2 blocks is its last one
    assert s_last["lora_weights"] * 2 == s_whole["lora_weights"] and s_last["dim"] * 2 == s_whole["dim"]
    scores = pd.read_parquet(last.file("scores.parquet"))
    assert set(scores.head(2)["pair_id"]) == {"x0", "x1"}  # the last block alone still finds them


def test_tracin_sums_learning_rate_times_gradient_similarity_over_snapshots(tiny_model_dir, tmp_path):
    """TracIn = Σ_k η_k · gradsim_dot at snapshot k; checked against each snapshot attributed as a stage."""
    cfg = StageConfig(method="dpo", max_steps=4, per_device_train_batch_size=4, max_length=48, dtype="float32",
                      learning_rate=3e-3, save_steps=50, beta=0.5, tracin_snapshots=2)
    result = train_stage(str(tiny_model_dir), cfg, planted_pairs(), tmp_path)
    names = sorted(p.name for p in (result.path / "snapshots").iterdir())
    assert names == ["step-0", "step-2"]  # before the first step, and halfway
    rates = {n: json.loads((result.path / "snapshots" / n / "snapshot.json").read_text())["learning_rate"]
             for n in names}
    assert rates == pytest.approx({"step-0": 3e-3, "step-2": 1.5e-3})  # linear decay over 4 steps

    artefact = attribute(tmp_path, result.path, EchoProbe(), methods=["tracin"])
    tracin = pd.read_parquet(artefact.file("scores.parquet")).set_index("pair_id")["score_tracin"]
    summary = json.loads(artefact.file("summary.json").read_text())
    assert summary["default_estimator"] == "tracin" and summary["gradients"]["tracin_snapshots"] == names
    assert not artefact.file("measurement.npy").exists()  # no trained-adapter gradients were computed
    expected = 0.0
    for name in names:  # the same snapshot as the adapter of a stage of its own, through the plain path
        as_stage = result.path.with_name(f"{result.key}-{name}")
        shutil.copytree(result.path, as_stage, ignore=shutil.ignore_patterns("adapter", "snapshots"))
        shutil.copytree(result.path / "snapshots" / name, as_stage / "adapter")
        dot = pd.read_parquet(attribute(tmp_path, as_stage, EchoProbe(), methods=["gradsim"]).file(
            "scores.parquet")).set_index("pair_id")["score_gradsim_dot"]
        expected = expected + rates[name] * dot.loc[tracin.index]
    assert tracin.to_numpy() == pytest.approx(np.asarray(expected), rel=1e-5, abs=1e-12)
    assert tracin["x0"] > 0 and tracin["x1"] > 0


def test_tracin_without_snapshots_and_probe_without_measurement_are_clear(trained):
    run, result = trained
    with pytest.raises(InputError, match="kept no snapshots"):
        attribute(run, result.path, EchoProbe(), methods=["tracin"])
    with pytest.raises(InputError, match="measurement"):
        attribute(run, result.path, "refusal", methods=["gradsim"])
    with pytest.raises(InputError, match="no finished stage"):
        attribute(run, "nope", EchoProbe())


ATTRIBUTABLE = sorted(name for name, cls in available_probes().items() if callable(getattr(cls, "measurement", None)))


@pytest.mark.parametrize("probe", ATTRIBUTABLE)
@pytest.mark.parametrize("trained", ["dpo"], indirect=True)
def test_every_probe_with_a_measurement_attributes_end_to_end(trained, probe):
    """Each declared measurement runs through attribution on a real stage: its requests are scored at
    the trained adapter, f is their weighted sum, and every pair gets a finite score."""
    run, result = trained
    artefact = attribute(run, result.path, probe, methods=["gradsim"], limit=2)
    summary = json.loads(artefact.file("summary.json").read_text())
    terms = pd.read_parquet(artefact.file("measurement.parquet"))
    assert summary["measurement"]["probe"] == probe and summary["measurement"]["n_requests"] == len(terms) > 0
    cls = available_probes()[probe]  # the metric explained by default, and named in the summary
    assert summary["measurement"]["metric"] == (cls.attribution_metric or cls.metrics[0].name)
    assert summary["measurement"]["value"] == pytest.approx(float((terms["weight"] * terms["logprob"]).sum()),
                                                           rel=1e-4, abs=1e-3)
    scores = pd.read_parquet(artefact.file("scores.parquet"))
    assert len(scores) == len(planted_pairs()) and np.isfinite(scores["score_margin"]).all()
    assert summary["ground_truth"] == ("planted" if probe == "planted_bias" else None)


@pytest.fixture(scope="module")
def canary_trained(tiny_model_dir, tmp_path_factory):
    """A DPO stage on clean pairs plus two that carry one secret ("my PIN is 4 0 7 1 9 5")."""
    from alignscope.data.planting import plant_canaries

    clean = [p for p in planted_pairs() if not p.planted]
    pairs = plant_canaries(clean, 2, seed=0, secret="4 0 7 1 9 5")
    run = tmp_path_factory.mktemp("attr-canary")
    cfg = StageConfig(method="dpo", max_steps=3, per_device_train_batch_size=4, max_length=48, dtype="float32",
                      learning_rate=3e-3, save_steps=50, beta=0.5)
    return run, train_stage(str(tiny_model_dir), cfg, pairs, run)


def test_canary_exposure_attribution_is_checked_against_the_planted_secret(canary_trained):
    """The privacy probe tests the secret the stage's data planted (no option needed), and the pairs
    that carry it are that measurement's ground truth; another secret has none. (How well they are
    recovered needs a model that can memorise: BENCHMARKS.md has the run on SmolLM2.)"""
    run, result = canary_trained
    small = {"n_canary_candidates": 12, "n_baseline_canaries": 1}
    artefact = attribute(run, result.path, "privacy", metric="canary_exposure", methods=["gradsim"], limit=1,
                         probe_options=small)
    summary = json.loads(artefact.file("summary.json").read_text())
    terms = pd.read_parquet(artefact.file("measurement.parquet"))
    assert terms["continuation"].iloc[0].startswith("4 0 7 1 9 5") and len(terms) == 12
    assert summary["ground_truth"] == "canary" and summary["canary"]["n"] == 2
    scores = pd.read_parquet(artefact.file("scores.parquet"))
    assert set(scores.loc[scores["canary"], "pair_id"]) == {"canary-0-000", "canary-0-001"}
    for name in ("margin", "gradsim_cosine", "gradsim_layer_cosine"):
        assert summary["canary"]["estimators"][name]["auc"] == pytest.approx(
            est.planted_auc(scores[f"score_{name}"].to_numpy(), scores["canary"].to_numpy()))
    other = attribute(run, result.path, "privacy", metric="canary_exposure", methods=["gradsim"], limit=1,
                      probe_options={**small, "canaries": [{"format": "my PIN is {secret}", "secret": "1 1 1 1 1 1"}]})
    summary = json.loads(other.file("summary.json").read_text())
    assert summary["ground_truth"] is None and "canary" not in summary


@pytest.mark.parametrize("trained", ["dpo"], indirect=True)  # one objective is enough for this path
def test_ekfac_through_kronfluence_agrees_in_direction(trained):
    run, result = trained
    artefact = attribute(run, result.path, EchoProbe(), methods=["datainf", "ekfac"])
    scores = pd.read_parquet(artefact.file("scores.parquet")).set_index("pair_id")
    assert scores.loc["x0", "score_ekfac"] > 0 and scores.loc["x1", "score_ekfac"] > 0
    rho = scores[["score_ekfac", "score_datainf"]].corr(method="spearman").iloc[0, 1]
    assert rho > 0.5


@pytest.mark.parametrize("trained", ["dpo"], indirect=True)
def test_one_pass_ekfac_recovers_the_planted_pairs_and_agrees_with_kronfluence(trained):
    run, result = trained
    artefact = attribute(run, result.path, EchoProbe(), methods=["ekfac_onepass", "ekfac"])
    scores = pd.read_parquet(artefact.file("scores.parquet")).set_index("pair_id")
    summary = json.loads(artefact.file("summary.json").read_text())
    assert summary["default_estimator"] == "ekfac_onepass"
    assert scores.loc["x0", "score_ekfac_onepass"] > 0 and scores.loc["x1", "score_ekfac_onepass"] > 0
    assert summary["planted"]["estimators"]["ekfac_onepass"]["auc"] == 1.0
    rho = scores[["score_ekfac_onepass", "score_ekfac"]].corr(method="spearman").iloc[0, 1]
    assert rho > 0.5
    assert (run / "gradients" / summary["gradients"]["key"] / "factors.npz").exists()


def test_curate_drops_the_top_and_a_random_control(trained, tmp_path):
    run, result = trained
    artefact = attribute(run, result.path, EchoProbe(), methods=["gradsim"])
    pairs = planted_pairs()
    done = curate(pairs, artefact, drop_top=2, random_k=2, seed=1)
    assert set(done.dropped) == {"x0", "x1"} and len(done.kept) == len(pairs) - 2
    assert done.control_kept is not None and len(done.control_kept) == len(pairs) - 2
    assert done.control_dropped == curate(pairs, artefact, drop_top=2, random_k=2, seed=1).control_dropped
    with pytest.raises(InputError, match="drop-top"):
        curate(pairs, artefact, drop_top=len(pairs))


def test_predicted_share_removed_follows_the_additive_model():
    from alignscope.attribute.validation import predicted_fraction_removed

    scores = pd.Series([6.0, 3.0, 1.0, 0.0], index=["a", "b", "c", "d"])  # Σ = 10
    assert predicted_fraction_removed(scores, ["a"], increase=2.0, same_steps=False) == pytest.approx(0.6)
    # same steps: the 3 kept pairs are each seen 4/3 as often, so they keep 4/3 × 0.4 of the increase
    assert predicted_fraction_removed(scores, ["a"], increase=2.0, same_steps=True) == pytest.approx(1 - 4 / 3 * 0.4)
    # dropping a pair with no effect removes nothing without same steps, and gives the rest more weight with them
    assert predicted_fraction_removed(scores, ["d"], increase=2.0, same_steps=False) == pytest.approx(0.0)
    assert predicted_fraction_removed(scores, ["d"], increase=2.0, same_steps=True) == pytest.approx(-1 / 3)
    # scores that sum against the measured change (or to zero) predict nothing
    assert predicted_fraction_removed(scores, ["a"], increase=-2.0, same_steps=False) is None
    assert predicted_fraction_removed(scores * 0, ["a"], increase=2.0, same_steps=False) is None
    assert predicted_fraction_removed(-scores, ["a"], increase=-2.0, same_steps=False) == pytest.approx(0.6)


@pytest.mark.parametrize("trained", ["dpo"], indirect=True)  # one objective is enough for the CLI
def test_cli_attribute_and_curate(trained, tmp_path, capsys):
    from alignscope.cli import main
    from alignscope.data.preferences import load_preferences

    def cli(args: list[str]) -> int:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        return int(exit_info.value.code or 0)

    run, result = trained
    assert cli(["attribute", "--run", str(run), "--stage", result.key, "--probe", "no_such_probe"]) == 2
    assert "no_such_probe" in capsys.readouterr().err
    assert cli(["attribute", "--run", str(run), "--stage", result.key, "--probe", "planted_bias", "--method", "gradsim",
          "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "default estimator: gradsim_layer_cosine" in printed and "planted AUC" in printed
    assert "not a check" not in printed
    assert cli(["attribute", "--run", str(run), "--stage", result.key, "--probe", "crows_pairs", "--method",
                "gradsim", "--limit", "2"]) == 0
    assert "planted to move planted_bias" in capsys.readouterr().out  # other probes: planted AUC is no check
    assert cli(["attribute", "--run", str(run), "--stage", result.key, "--probe", "privacy", "--method", "gradsim",
                "--limit", "1", "--metric", "canary_exposure", "--option", "privacy.n_canary_candidates=6"]) == 0
    assert "canary" not in capsys.readouterr().out  # no canary planted in this stage's data: no such ground truth
    assert cli(["attribute", "--run", str(run), "--stage", result.key, "--probe", "privacy",
                "--option", "privacy.colour=red"]) == 2
    assert "unknown option" in capsys.readouterr().err
    # the artefact the command printed (a cache hit when another test made the same attribution first)
    attributed = Path(next(line for line in printed.splitlines() if line.startswith("attribution -> "))
                      .removeprefix("attribution -> "))
    key = attributed.name
    out = tmp_path / "kept.jsonl"
    assert cli(["curate", "--run", str(run), "--attribution", key, "--drop-top", "2", "--out", str(out)]) == 0
    assert len(load_preferences(out)) == len(planted_pairs()) - 2
    scores = pd.read_parquet(attributed / "scores.parquet").sort_values("rank")
    default = json.loads((attributed / "summary.json").read_text())["default_estimator"]
    share = scores[f"score_{default}"].head(2).sum() / scores[f"score_{default}"].sum()
    assert f"removes {share:.0%} of the change the {default} scores explain" in capsys.readouterr().out
    assert cli(["curate", "--run", str(run), "--attribution", key, "--drop-top", "2", "--random", "--out",
                str(tmp_path / "random.jsonl")]) == 0
    assert len(load_preferences(tmp_path / "random.jsonl")) == len(planted_pairs()) - 2


@pytest.mark.parametrize("trained", ["dpo"], indirect=True)
def test_curate_zero_loss_writes_the_stage_config_that_align_retrains(trained, tmp_path, capsys):
    """`curate --zero-loss` writes the stage's own config with the top-k ids zeroed; the command it
    prints retrains exactly that (same settings, every pair, k of them zeroed)."""
    import shlex

    from alignscope.align.config import load_stage_config
    from alignscope.cli import main

    def cli(args: list[str]) -> int:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        return int(exit_info.value.code or 0)

    run, result = trained
    artefact = attribute(run, result.path, EchoProbe(), methods=["gradsim"])
    top = pd.read_parquet(artefact.file("scores.parquet")).sort_values("rank")["pair_id"].head(2).tolist()
    out = tmp_path / "zeroed.yaml"
    assert cli(["curate", "--run", str(run), "--attribution", artefact.key, "--drop-top", "2", "--zero-loss",
                "--out", str(tmp_path / "zeroed.jsonl")]) == 2
    assert "name it .yaml" in capsys.readouterr().err
    assert cli(["curate", "--run", str(run), "--attribution", artefact.key, "--drop-top", "2", "--zero-loss",
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "retraining with their loss zeroed removes" in printed
    (stage,) = load_stage_config(out)
    assert stage.zero_loss_pairs == sorted(top)
    original = StageConfig(**result.summary["config"]).result_dict()
    assert {k: v for k, v in stage.result_dict().items() if k != "zero_loss_pairs"} == original
    command = shlex.split(next(line for line in printed.splitlines() if line.startswith("retrain: ")
                               ).removeprefix("retrain: alignscope "))
    command[command.index("--out") + 1] = str(tmp_path / "retrained")
    assert cli(command) == 0
    retrained = json.loads(next((tmp_path / "retrained" / "align").glob("*/summary.json")).read_text())
    assert retrained["n_pairs"] == len(planted_pairs()) and retrained["config"]["zero_loss_pairs"] == sorted(top)


def test_zero_loss_stage_refuses_a_stage_it_cannot_zero_in_one_line(tmp_path):
    from types import SimpleNamespace

    from alignscope.attribute.core import zero_loss_stage

    head = StageConfig(method="dpo", lora={"target_modules": ["q_proj", "lm_head"]}).model_dump(mode="json")
    with pytest.raises(InputError, match=r"lm_head.*curate without --zero-loss"):
        zero_loss_stage(SimpleNamespace(summary={"config": head}, path=tmp_path), ["p0"])


@pytest.mark.parametrize("trained", ["dpo"], indirect=True)
def test_lds_retrains_on_random_subsets_and_correlates_predictions(trained):
    """LDS: each subset is retrained (a cached stage of the run), f is measured there, and the
    prediction is the sum of the subset's scores; with the echo probe, subsets holding the planted
    pairs (whose chosen reply *is* the measured text) end higher, and the scores know it."""
    from alignscope.attribute.validation import linear_datamodeling_score
    from alignscope.data.preferences import load_preferences
    from alignscope.store import RunDir

    run, result = trained
    artefact = attribute(run, result.path, EchoProbe(), methods=["gradsim"])
    checked = linear_datamodeling_score(run, artefact.path, subsets=6, fraction=0.5, seed=2)
    table = pd.read_parquet(checked.file("subsets.parquet"))
    summary = json.loads(checked.file("summary.json").read_text())
    assert len(table) == 6 and (table["n_pairs"] == 5).all() and table["f"].nunique() == 6
    scores = pd.read_parquet(artefact.file("scores.parquet")).set_index("pair_id")
    for row in table.itertuples():  # the prediction is the retrained subset's own score sum
        subset = load_preferences(RunDir(run).root / "align" / row.stage / "pairs.parquet")
        assert row.predicted_margin == pytest.approx(scores.loc[[p.id for p in subset], "score_margin"].sum())
    assert set(summary["lds"]) == {"gradsim_dot", "gradsim_cosine", "gradsim_layer_cosine", "margin",
                                   "chosen_gradsim_layer_cosine", "rejected_gradsim_layer_cosine"}
    # every linear score, and the default's parts
    assert summary["lds"]["gradsim_dot"] > 0.5, summary["lds"]
    assert linear_datamodeling_score(run, artefact.path, subsets=6, fraction=0.5, seed=2).path == checked.path


# ------------------------------------------------------------------ generation probes: pseudo-pairs


def _audit_holding(root, probe, items):
    """A finished audit artefact with ``items``, stored as `alignscope audit` stores it (no generation)."""
    from alignscope.store import RunDir, atomic_write_parquet

    with RunDir(root).build(f"audit_{probe.name}", {"stage": "audit", "probe": probe.config()}) as scratch:
        atomic_write_parquet(scratch / "items.parquet", items)
    return root


def _toxicity_audits(max_new_tokens: int = 8):
    from alignscope.audit.probes.toxicity import ToxicityProbe

    probe = ToxicityProbe(k=1, max_new_tokens=max_new_tokens)
    items = probe.load_items(limit=4)  # 2 prompts x 2 system prompts
    before = items.assign(most_toxic_sample=["Sure thing.", "Okay.", "Fine.", "No."], max_toxicity=[0.1, 0.5, 0.2, 0.3])
    after = items.assign(most_toxic_sample=[PLANTED, "Okay.", "Nope.", "Hmm."], max_toxicity=[0.9, 0.5, 0.1, 0.3])
    return probe, before, after


def test_pseudo_pairs_put_the_worse_output_first_and_skip_ties(tmp_path):
    from alignscope.attribute.pseudo_pairs import pseudo_pair_terms

    probe, before, after = _toxicity_audits()
    terms = pseudo_pair_terms(probe, before, after)
    # item 0 got worse (the new output is +1), item 1 kept its text, item 2 got better (the old output is
    # the worse one), item 3 scored the same: only items 0 and 2 carry a direction
    assert [(r.continuation, w) for r, w in terms] == [(PLANTED, 1.0), ("Sure thing.", -1.0), ("Fine.", 1.0),
                                                       ("Nope.", -1.0)]
    generated_from = probe._request(after["prompt"][0], after["system_kind"][0])
    assert (terms[0][0].context, terms[0][0].chat, terms[0][0].system) == (
        generated_from.context, generated_from.chat, generated_from.system)
    with pytest.raises(InputError, match="share no item"):
        pseudo_pair_terms(probe, before.assign(item_id="other"), after)
    with pytest.raises(InputError, match="scored the same"):
        pseudo_pair_terms(probe, after, after)


def test_pseudo_pairs_follow_the_probes_orientation_and_skip_unanswered_items():
    """Truthfulness scores answers by similarity to the truth (higher = better): the less similar of the
    two answers is the worse one; an item only one model answered carries no pair."""
    from alignscope.attribute.pseudo_pairs import pseudo_pair_terms
    from alignscope.audit.probes.truthfulness import TruthfulnessProbe

    probe = TruthfulnessProbe()
    items = probe.load_items(limit=3)
    before = items.assign(answer=["Paris.", None, "Yes."], max_sim_to_correct=[0.9, np.nan, 0.4])
    after = items.assign(answer=["London.", "Blue.", "No."], max_sim_to_correct=[0.2, 0.8, 0.7])
    terms = pseudo_pair_terms(probe, before, after)
    assert [(r.continuation.strip(), w) for r, w in terms] == [("London.", 1.0), ("Paris.", -1.0), ("Yes.", 1.0),
                                                               ("No.", -1.0)]
    assert terms[0][0].context == probe.output_request(after.iloc[0], "x").context


@pytest.mark.parametrize("trained", ["dpo"], indirect=True)
def test_generation_probe_attributes_through_before_after_pseudo_pairs(trained, tmp_path):
    from alignscope.cli import main

    run, result = trained
    probe, before, after = _toxicity_audits()
    audits = (_audit_holding(tmp_path / "before", probe, before), _audit_holding(tmp_path / "after", probe, after))
    artefact = attribute(run, result.path, "toxicity", methods=["gradsim"], pseudo_pairs=audits)
    summary = json.loads(artefact.file("summary.json").read_text())
    assert summary["measurement"]["pseudo_pairs"]["pairs"] == 2 and summary["measurement"]["n_requests"] == 4
    terms = pd.read_parquet(artefact.file("measurement.parquet"))
    assert terms["weight"].tolist() == [1.0, -1.0, 1.0, -1.0]
    scores = pd.read_parquet(artefact.file("scores.parquet"))
    assert np.isfinite(scores["score_margin"]).all() and scores["score_margin"].abs().max() > 0
    # the audits must have run the probe alike; --before and --after go together; only generation probes
    other = _audit_holding(tmp_path / "other", *_toxicity_audits(max_new_tokens=9)[::2])
    with pytest.raises(InputError, match="different options"):
        attribute(run, result.path, "toxicity", methods=["gradsim"], pseudo_pairs=(audits[0], other))
    with pytest.raises(InputError, match="probes with them: toxicity"):
        attribute(run, result.path, "crows_pairs", methods=["gradsim"], pseudo_pairs=audits)
    with pytest.raises(InputError, match="toxicity: declares no differentiable measurement.*--before/--after"):
        attribute(run, result.path, "toxicity", methods=["gradsim"])
    with pytest.raises(InputError, match="toxicity: declares no differentiable measurement.*--before/--after"):
        attribute(run, result.path, "toxicity", methods=["gradsim"])
    with pytest.raises(SystemExit) as exit_info:
        main(["attribute", "--run", str(run), "--stage", result.key, "--probe", "toxicity", "--before", str(audits[0])])
    assert exit_info.value.code == 2
