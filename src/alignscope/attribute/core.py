"""``attribute``: which preference pairs of a stage moved a probe's metric; ``curate``: drop them.

Two functions define the problem (kronfluence's ``Task`` idea): the stage's per-pair training
objective (``objective.py``) and the probe's measurement ``f(θ) = Σ weight × log p_θ(continuation |
context)``, higher = worse (``Probe.measurement``). Gradients of both at the trained adapter are
collected once (``gradients.py``, cached in ``RUN/gradients/<key>/``) and every estimator
(``estimators.py``) only combines them. Output, ``RUN/attribution/<key>/``:

    scores.parquet   one row per pair: pair_id, prompt, chosen, rejected, planted, group,
                     score_<estimator> for each, chosen_<default>/rejected_<default>, loss, margin, rank
    ranked.json      the same rows, best-ranked first, with the default estimator and the sign
                     convention (for readers without Parquet)
    summary.json     estimators, default estimator, sign convention, measurement, timings per phase,
                     and with planted labels: planted-pair AUC and recall@k per estimator
    measurement.parquet / measurement.npy   the measurement's requests and log-probs, and its gradient
                     ∇f = Σ weight × ∇log p at the trained adapter (float32; absent when only TracIn ran)
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignscope.attribute import estimators as est
from alignscope.errors import InputError
from alignscope.store import Artefact, RunDir, atomic_write_json, atomic_write_parquet, content_hash

ATTRIBUTION_STAGE = "attribution"
METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "gradsim": ("gradsim_dot", "gradsim_cosine", "gradsim_layer_cosine", "margin", "self_influence"),
    "datainf": ("datainf",),
    "ekfac_onepass": ("ekfac_onepass",),
    "tracin": ("tracin",),
    "ekfac": ("ekfac",),
    "kfac": ("kfac",),
}
METHODS = (*METHOD_GROUPS, "all")
DEFAULT_METHODS = ("gradsim", "datainf")
#: Which blocks' LoRA weights the gradients cover by default (see ``gradients.check_layers``).
DEFAULT_LAYERS = "last:50%"
#: Projection of a fully fine-tuned stage's gradients when none is asked for: about as many dims as
#: the LoRA default's exact gradients on SmolLM2 (1.2 M over the later half), where the unprojected
#: weight matrices would take 53 M floats per reply.
FULL_PROJECT_DIM = 2**20
FULL_WEIGHTS = ("the linear weights of the transformer blocks (full fine-tuning; embeddings, norms and the output "
                "head are not covered)")
#: What ``--method all`` runs: every estimator that needs nothing the stage may lack (checkpoints).
ALL_METHODS = ("gradsim", "datainf", "ekfac_onepass", "ekfac")
#: Preference order of the default estimator; raw dot is never the default (see estimators.py).
#: The per-weight cosine first among the similarity scores: over the later half of the blocks it ranked
#: the planted pairs better than the whole-vector cosine on six of six fresh seeds (+0.005 to +0.045 AUC,
#: BENCHMARKS.md, session 9), which was itself ahead of the margin (session 8).
_DEFAULT_ORDER = ("tracin", "ekfac_onepass", "gradsim_layer_cosine", "gradsim_cosine", "margin", "datainf", "ekfac",
                  "kfac")


def expand_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Method groups (gradsim, datainf, tracin, ekfac, kfac, all) → estimator names, in order."""
    names = [methods] if isinstance(methods, str) else list(methods)
    names = [part.strip() for name in names for part in name.split(",") if part.strip()]  # "gradsim,datainf"
    out: list[str] = []
    for name in names:
        if name not in METHODS and name not in est.ESTIMATORS:
            raise InputError(f"--method {name}: unknown; use one of {', '.join(METHODS)}")
        groups = ALL_METHODS if name == "all" else (name,)
        for group in groups:
            for e in METHOD_GROUPS.get(group, (group,)):
                if e not in out:
                    out.append(e)
    if not out:
        raise InputError("--method: give at least one of " + ", ".join(METHODS))
    return tuple(out)


def resolve_stage(run: RunDir, stage: str | Path) -> Any:
    """A stage given as a directory, or as a key under ``RUN/align/``."""
    from alignscope.align.stage import ALIGN_STAGE, StageResult

    candidates = [Path(stage), run.root / ALIGN_STAGE / str(stage)]
    for path in candidates:
        if (path / "summary.json").exists():
            return StageResult.from_dir(path)
    raise InputError(f"--stage {stage}: no finished stage there (looked for summary.json in "
                     f"{' and '.join(str(c) for c in candidates)}); pass a stage directory or a key under RUN/align/")


def stage_pairs(stage: Any, data: str | Path | None = None) -> list[Any]:
    """The pairs a stage trained on: its ``pairs.parquet``, or ``data`` for stages that predate it."""
    from alignscope.align.stage import PAIRS_FILE
    from alignscope.data.preferences import load_preferences

    if data is not None:
        return load_preferences(data)
    path = stage.path / PAIRS_FILE
    if not path.exists():
        raise InputError(f"stage {stage.path}: has no {PAIRS_FILE} (trained by an older alignscope); pass the "
                         "training data with --data")
    return load_preferences(path)


def _probe(probe: Any, options: dict[str, Any] | None, pairs: Sequence[Any] = ()) -> Any:
    """The probe instance; a name is built with what ``pairs`` planted for it, then ``options``."""
    from alignscope.audit.runner import available_probes

    known = available_probes()
    if isinstance(probe, str):
        if probe not in known:
            raise InputError(f"--probe {probe}: unknown probe; see `alignscope probes list`")
        probe = known[probe](**{**known[probe].options_for(pairs), **(options or {})})
    if not callable(getattr(probe, "measurement", None)):
        usable = sorted(n for n, cls in known.items() if callable(getattr(cls, "measurement", None)))
        hint = (" (its generated outputs can be: pass the audits before and after alignment with --before/--after)"
                if hasattr(probe, "generation_output") else "")
        raise InputError(f"probe {probe.name}: declares no differentiable measurement to attribute{hint}; probes "
                         f"with one: {', '.join(usable) or 'none'}")
    return probe


def explained_metric(probe: Any, metric: str | None) -> str:
    """The metric an attribution explains: the one named, else the probe's ``attribution_metric``, else
    its first metric. The study curates on the same name, so the two always talk about one metric."""
    names = [m.name for m in probe.metrics]
    if metric is not None and metric not in names:
        raise InputError(f"--metric {metric}: probe {probe.name} has metrics {', '.join(names)}")
    return metric or getattr(probe, "attribution_metric", None) or names[0]


def measurement_terms(probe: Any, items: pd.DataFrame, metric: str | None) -> tuple[list[Any], list[float]]:
    """The probe's measurement of the explained metric as (score requests, weights)."""
    metric = explained_metric(probe, metric)
    accepts_metric = "metric" in inspect.signature(probe.measurement).parameters
    terms = probe.measurement(items, metric=metric) if accepts_metric else probe.measurement(items)
    if not terms:
        raise InputError(f"probe {probe.name}: its measurement is empty for these items; use more items")
    return [t[0] for t in terms], [float(t[1]) for t in terms]


def default_estimator(computed: Sequence[str]) -> str:
    for name in _DEFAULT_ORDER:
        if name in computed:
            return name
    linear = [c for c in computed if c not in ("self_influence",)]
    return linear[0] if linear else computed[0]


def attribute(run: RunDir | str | Path, stage_dir: str | Path, probe: Any, *, metric: str | None = None,
              methods: Sequence[str] | str = DEFAULT_METHODS, project_dim: int | None = None,
              items: pd.DataFrame | None = None, out: RunDir | str | Path | None = None,
              limit: int | None = None, seed: int = 0, data: str | Path | None = None,
              probe_options: dict[str, Any] | None = None, dtype: str | None = None,
              batch_tokens: int = 4096, chunk_pairs: int = 64,
              pseudo_pairs: tuple[str | Path, str | Path] | None = None, layers: str | None = None) -> Artefact:
    """Score every training pair of a stage by its influence on a probe's measurement.

    Args:
        run: run directory holding the stage (and its reference cache).
        stage_dir: the stage directory, or its key under ``RUN/align/``.
        probe: a probe name or instance that declares ``measurement(items)``.
        metric: the probe metric being explained (recorded; passed to the probe when it accepts it).
        methods: method groups or estimator names (``gradsim``, ``datainf``, ``tracin``, ``ekfac``,
            ``kfac``, ``all``).
        project_dim: random-projection size of the gradients (None: exact gradients).
        items: the probe's items (default: ``probe.load_items(limit=limit, seed=seed)``).
        out: where the artefact is written (default: ``run``).
        data: training pairs for a stage without ``pairs.parquet``.
        probe_options: options of a probe given by name. They override what the stage's planted data
            implies (:meth:`~alignscope.audit.base.Probe.options_for`: the planted group for
            planted_bias, the planted secret for privacy), which is the default.
        dtype: model weights dtype (default: the stage's training dtype).
        batch_tokens: padded tokens per forward/backward pass.
        chunk_pairs: pairs per stored chunk (the resume granularity, and the unit shared between
            ``accelerate launch`` processes).
        pseudo_pairs: (audit run before alignment, audit run after) for a generation probe: the
            measurement is then the worse-minus-better log-prob of each item's two outputs
            (:mod:`alignscope.attribute.pseudo_pairs`); ``probe`` must be its name.
        layers: which transformer blocks' LoRA weights the gradients cover: ``all``, ``last:N`` or
            ``last:P%`` (default :data:`DEFAULT_LAYERS`; see :func:`~alignscope.attribute.gradients.check_layers`).

    Returns:
        The ``RUN/attribution/<key>/`` artefact (a cache hit when nothing changed).
    """
    from alignscope.attribute.gradients import check_layers
    from alignscope.data.preferences import preferences_fingerprint

    run = run if isinstance(run, RunDir) else RunDir(run)
    target = run if out is None else (out if isinstance(out, RunDir) else RunDir(out))
    estimators = expand_methods(methods)
    layers = check_layers(DEFAULT_LAYERS if layers is None else layers)
    stage = resolve_stage(run, stage_dir)
    from alignscope.attribute.objective import objective_from_summary

    objective = objective_from_summary(stage.summary)
    pairs = stage_pairs(stage, data)
    if pseudo_pairs is not None:
        from alignscope.attribute.pseudo_pairs import pseudo_pair_measurement

        probe, requests, weights, items = pseudo_pair_measurement(str(probe), *pseudo_pairs)
        explained_metric(probe, metric)  # a bad --metric is still named
    else:
        probe = _probe(probe, probe_options, pairs)  # measures what this data planted (its group, its secret)
        if items is None:
            items = probe.load_items(limit=limit, seed=seed)
        requests, weights = measurement_terms(probe, items, metric)
    if project_dim is None and stage.summary.get("finetune") == "full":
        project_dim = FULL_PROJECT_DIM  # a full model's per-pair gradients would not fit unprojected
    grad = _GradientSettings(project_dim, layers, seed, dtype or stage.summary.get("precision", {}).get(
        "weights", "float32"), batch_tokens, chunk_pairs)
    inputs = {"stage": ATTRIBUTION_STAGE, "align": stage.key, "data": preferences_fingerprint(pairs),
              "probe": probe.config(), "metric": metric, "estimators": list(estimators),
              "default_estimator": default_estimator(estimators),  # it ranks the pairs: a new default recomputes
              "project_dim": project_dim,
              "seed": seed, "dtype": grad.dtype, **grad.layer_key(),
              "measurement": content_hash([[r.to_dict(), w] for r, w in zip(requests, weights)])}
    found = target.find(ATTRIBUTION_STAGE, inputs)
    if found is not None:
        return found
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    lm = stage.load(dtype=grad.dtype)
    timings["load_s"] = time.perf_counter() - clock
    result = _compute(target, stage, lm, objective, pairs, requests, weights, estimators, grad, timings)
    from alignscope.models.engine import _distributed_state

    state = _distributed_state()
    if state is None or state.is_main_process:
        _write(target, inputs, result, stage, objective, pairs, probe, metric, requests, weights, timings, len(items),
               pseudo_pairs)
    if state is not None:
        state.wait_for_everyone()  # other ranks return only once rank 0 has written the artefact
    found = target.find(ATTRIBUTION_STAGE, inputs)
    assert found is not None
    return found


def _write(target: RunDir, inputs: dict[str, Any], result: _Result, stage: Any, objective: Any, pairs: list[Any],
           probe: Any, metric: str | None, requests: list[Any], weights: list[float], timings: dict[str, float],
           n_items: int, pseudo_pairs: tuple[str | Path, str | Path] | None = None) -> None:
    frame, summary, logps, mgrad = _outputs(result, stage, objective, pairs, probe, metric, requests, weights)
    if pseudo_pairs is not None:
        summary["measurement"]["pseudo_pairs"] = {
            "before": str(pseudo_pairs[0]), "after": str(pseudo_pairs[1]), "pairs": len(requests) // 2,
            "description": "per item, log p(worse output) - log p(better output) of the two audited models' "
                           f"outputs, worse by {probe.generation_output[1]}"}
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    summary["items"] = n_items
    with target.build(ATTRIBUTION_STAGE, inputs) as scratch:
        atomic_write_parquet(scratch / "scores.parquet", frame)
        atomic_write_json(scratch / "ranked.json", {
            "default_estimator": summary["default_estimator"], "sign_convention": summary["sign_convention"],
            "pairs": frame.sort_values("rank", kind="stable").to_dict(orient="records")})
        atomic_write_json(scratch / "summary.json", summary)
        atomic_write_parquet(scratch / "measurement.parquet", pd.DataFrame({
            "context": [r.context for r in requests], "continuation": [r.continuation for r in requests],
            "chat": [r.chat for r in requests], "weight": weights, "logprob": logps}))
        if mgrad is not None:
            np.save(scratch / "measurement.npy", mgrad.astype(np.float32))


@dataclass
class _Result:
    gradients: Any
    scores: dict[str, est.Scores | np.ndarray]
    logps: np.ndarray
    measurement: np.ndarray | None  # ∇f at the trained adapter (None: TracIn only)
    gradient_key: str
    snapshots: list[str]
    layers: str  # the layer selection the gradients cover


@dataclass(frozen=True)
class _GradientSettings:
    """How the gradients are taken: they key the gradient cache, so they travel together."""

    project_dim: int | None
    layers: str
    seed: int
    dtype: str
    batch_tokens: int
    chunk_pairs: int

    def layer_key(self) -> dict[str, str]:
        """The cache-key entry of the layer selection (absent for all layers, so older caches stay valid)."""
        from alignscope.attribute.gradients import ALL_LAYERS

        return {} if self.layers == ALL_LAYERS else {"layers": self.layers}


def _compute(run: RunDir, stage: Any, lm: Any, objective: Any, pairs: list[Any], requests: list[Any],
             weights: list[float], estimators: tuple[str, ...], grad: _GradientSettings,
             timings: dict[str, float]) -> _Result:
    """Gradients (cached in ``run``), measurement gradients and every estimator's scores.

    Estimators other than TracIn read gradients at the trained adapter; TracIn reads them at each
    snapshot the stage kept. With TracIn alone the trained adapter's pair gradients are skipped
    (the scores table's loss/margin then come from the latest snapshot).
    """
    from alignscope.align.config import StageConfig
    from alignscope.align.reference import stage_reference

    config = StageConfig(**stage.summary["config"])
    reference = stage_reference(stage.path) if objective.needs_reference else None

    def gradients_at(model: Any, snapshot: str | None) -> tuple[Any, np.ndarray, np.ndarray]:
        factors = snapshot is None and "ekfac_onepass" in estimators
        return _gradients(run, stage, model, objective, pairs, requests, weights, config, reference, grad, timings,
                          snapshot, factors)

    checkpoints: list[tuple[float, Any, np.ndarray]] = []
    snapshot_names: list[str] = []
    if "tracin" in estimators:
        for snapshot, learning_rate in _snapshots(stage):
            model = stage.load_snapshot(snapshot, dtype=grad.dtype)
            snapshot_gs, _, snapshot_mgrad = gradients_at(model, snapshot.name)
            del model
            checkpoints.append((learning_rate, snapshot_gs, snapshot_mgrad))
            snapshot_names.append(snapshot.name)
    if any(name != "tracin" for name in estimators):
        gs, logps, mgrad = gradients_at(lm, None)
    else:
        gs, mgrad = checkpoints[-1][1], None
        logps = _logprobs(lm, requests, grad.batch_tokens)
    scores: dict[str, est.Scores | np.ndarray] = {}
    clock = time.perf_counter()
    products = est.side_products(gs, mgrad) if mgrad is not None else {}
    for name in estimators:
        start = time.perf_counter()
        if name == "gradsim_dot":
            scores[name] = est.gradsim_dot(gs, mgrad, products)
        elif name == "gradsim_cosine":
            scores[name] = est.gradsim_cosine(gs, mgrad, products)
        elif name == "gradsim_layer_cosine":
            scores[name] = est.gradsim_layer_cosine(gs, mgrad)
        elif name == "margin":
            scores[name] = est.margin(gs, mgrad, products)
        elif name == "self_influence":
            scores[name] = est.self_influence(gs)
        elif name == "datainf":
            scores[name] = est.datainf(gs, mgrad)
        elif name == "ekfac_onepass":
            scores[name] = est.ekfac_onepass(gs, mgrad)
        elif name == "tracin":
            scores[name] = est.tracin(checkpoints)
        elif name in ("ekfac", "kfac"):
            from alignscope.attribute.kfac import kronfluence_scores

            scores[name] = kronfluence_scores(lm, pairs, objective, requests, weights, config=config,
                                              reference=reference, strategy=name, work=run.root / ".work" / name,
                                              layers=grad.layers)
        timings[f"score_{name}_s"] = time.perf_counter() - start
    timings["scoring_s"] = time.perf_counter() - clock
    return _Result(gs, scores, logps, mgrad, gs.path.name, snapshot_names, grad.layers)


def _gradients(run: RunDir, stage: Any, lm: Any, objective: Any, pairs: list[Any], requests: list[Any],
               weights: list[float], config: Any, reference: Any, grad: _GradientSettings, timings: dict[str, float],
               snapshot: str | None, factors: bool = False) -> tuple[Any, np.ndarray, np.ndarray]:
    """Per-pair gradients (cached) and the measurement's gradient ∇f of one adapter state
    (with ``factors``, the gradient set also keeps the K-FAC sums that ``ekfac_onepass`` needs)."""
    from alignscope.attribute.gradients import GRADIENT_STAGE, WeightGradients, collect_pair_gradients, \
        measurement_gradients
    from alignscope.data.preferences import preferences_fingerprint

    grad_inputs = {"stage": GRADIENT_STAGE, "align": stage.key, "data": preferences_fingerprint(pairs),
                   "project_dim": grad.project_dim, "seed": grad.seed, "dtype": grad.dtype,
                   "objective": objective.description, "max_length": config.max_length,
                   "truncation_mode": config.truncation_mode, **grad.layer_key()}
    if snapshot is not None:
        grad_inputs["snapshot"] = snapshot
    if factors:
        grad_inputs["factors"] = True
    suffix = f"_{snapshot}" if snapshot else ""
    clock = time.perf_counter()
    gs = collect_pair_gradients(lm, pairs, objective, run=run, inputs=grad_inputs, max_length=config.max_length,
                                truncation_mode=config.truncation_mode, reference=reference,
                                project_dim=grad.project_dim, seed=grad.seed, batch_tokens=grad.batch_tokens,
                                chunk_pairs=grad.chunk_pairs, factors=factors, layers=grad.layers)
    timings[f"train_gradients{suffix}_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    logps, mgrad = measurement_gradients(lm, WeightGradients(lm.model, grad.project_dim, grad.seed, layers=grad.layers),
                                         requests, weights, grad.batch_tokens, summed=True)
    timings[f"measurement_gradients{suffix}_s"] = time.perf_counter() - clock
    return gs, logps, mgrad


def _logprobs(lm: Any, requests: list[Any], batch_tokens: int) -> np.ndarray:
    """The measurement's log-probs at the trained adapter, without gradients."""
    from alignscope.attribute.gradients import measurement_rows, side_logprobs
    from alignscope.attribute.objective import LogProbModel

    lm.model.eval()
    lp = LogProbModel(lm.model, lm.tokenizer.pad_token_id or 0)
    return side_logprobs(lp, {"measurement": measurement_rows(lm, requests)}, batch_tokens)["measurement"]


def _snapshots(stage: Any) -> list[tuple[Path, float]]:
    """TracIn inputs: the stage's adapter snapshots and the learning rate of the step each preceded."""
    import json

    from alignscope.align.stage import SNAPSHOT_DIR

    found = sorted(stage.path.glob(f"{SNAPSHOT_DIR}/step-*"), key=lambda p: int(p.name.removeprefix("step-")))
    if not found:
        raise InputError(f"--method tracin: stage {stage.path} kept no snapshots (TracIn sums over adapters saved "
                         "during training); retrain it with `tracin_snapshots: 4` in the stage config, or use "
                         "--method gradsim or datainf")
    return [(p, float(json.loads((p / "snapshot.json").read_text())["learning_rate"])) for p in found]


def _outputs(result: _Result, stage: Any, objective: Any, pairs: list[Any], probe: Any, metric: str | None,
             requests: list[Any], weights: list[float]) -> tuple[pd.DataFrame, dict[str, Any], np.ndarray, np.ndarray]:
    computed = list(result.scores)
    default = default_estimator(computed)
    table = result.gradients.table
    frame = pd.DataFrame({
        "pair_id": [p.id for p in pairs], "prompt": [p.prompt_text for p in pairs],
        "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs],
        "planted": [bool(p.planted) for p in pairs], "group": [p.group for p in pairs]})
    for name, value in result.scores.items():
        frame[f"score_{name}"] = _score_column(value)
    chosen_default = result.scores[default]
    extra = [s for s in getattr(chosen_default, "sides", {}) if s not in ("chosen", "rejected")]  # ORPO's prompt
    for side in ("chosen", "rejected", *extra):
        if isinstance(chosen_default, est.Scores) and side in chosen_default.sides:
            frame[f"{side}_{default}"] = chosen_default.sides[side][:, 0]
        else:
            frame[f"{side}_{default}"] = 0.0 if side == "rejected" else frame[f"score_{default}"]
    frame["loss"] = table["loss"].to_numpy()
    frame["margin"] = table["margin"].to_numpy()
    order = np.argsort(-frame[f"score_{default}"].to_numpy(), kind="stable")
    frame["rank"] = 0
    frame.loc[order, "rank"] = np.arange(1, len(frame) + 1)
    frame = frame.sort_values("rank").reset_index(drop=True)
    f_value = float(np.dot(weights, result.logps))
    explained = explained_metric(probe, metric)
    summary: dict[str, Any] = {
        "stage": str(stage.path), "align_key": stage.key, "method": objective.method,
        "objective": objective.description, "estimators": computed, "default_estimator": default,
        "sign_convention": est.SIGN_CONVENTION,
        "measurement": {"probe": probe.name, "metric": explained,
                        "n_requests": len(requests), "value": f_value,
                        "description": "f(θ) = Σ weight × log p_θ(continuation | context) over the probe's "
                                       "measurement requests; higher = worse"},
        "gradients": {"key": result.gradient_key, "dim": int(result.gradients.dim), "layers": result.layers,
                      "lora_weights": len(result.gradients.layers), "tracin_snapshots": result.snapshots,
                      "weights": FULL_WEIGHTS if stage.summary.get("finetune") == "full" else "LoRA A and B"},
        "n_pairs": len(pairs),
    }
    planted = np.array([bool(p.planted) for p in pairs])  # pair order, as the estimators' rows (frame is ranked)
    if planted.any():
        summary["planted"] = {"n_planted": int(planted.sum()), "k": int(planted.sum()), "estimators": {
            name: _recovery(result.scores[name], planted) for name in computed}}
    truth = probe.ground_truth(explained, pairs)
    summary["ground_truth"] = truth[0] if truth else None
    if truth and truth[0] != "planted":  # e.g. canaries: recovered the same way, under their own name
        labels = np.array(truth[1], dtype=bool)
        by_id = dict(zip((p.id for p in pairs), labels))
        frame[truth[0]] = [bool(by_id[i]) for i in frame["pair_id"]]
        summary[truth[0]] = {"n": int(labels.sum()), "k": int(labels.sum()), "estimators": {
            name: _recovery(result.scores[name], labels) for name in computed}}
    return frame, summary, result.logps, result.measurement


def _score_column(value: est.Scores | np.ndarray) -> np.ndarray:
    """One score per pair (the single measurement column of a linear estimator, or the raw array)."""
    return (value.total[:, 0] if isinstance(value, est.Scores) else np.asarray(value)).astype(float)


def _recovery(value: Any, planted: np.ndarray) -> dict[str, Any]:
    """Planted-pair AUC and recall@k of a score, and of its chosen / rejected parts where it has them.

    The parts are kept apart because they behave differently and can cancel: on the default study
    the chosen part ranks the planted pairs at a step-0 snapshot, while at the trained adapter the
    rejected part (declines that name the group) does and the chosen part ranks them last
    (BENCHMARKS.md, session 5).
    """
    def stats(column: np.ndarray) -> dict[str, float]:
        return {"auc": est.planted_auc(column, planted), "recall_at_k": est.recall_at_k(column, planted)}

    out: dict[str, Any] = stats(_score_column(value))
    if isinstance(value, est.Scores) and len(value.sides) > 1:
        out["sides"] = {side: stats(part[:, 0]) for side, part in value.sides.items()}
    return out


# --------------------------------------------------------------------------- curation


@dataclass
class Curation:
    """Pairs kept after dropping the top-k attributed ones, and the random-drop control."""

    kept: list[Any]
    dropped: list[str]
    control_kept: list[Any] | None
    control_dropped: list[str] | None


def _ranked_ids(scores: pd.DataFrame | Artefact | str | Path) -> list[str]:
    if isinstance(scores, Artefact):
        scores = scores.path
    if isinstance(scores, (str, Path)):
        path = Path(scores)
        path = path / "scores.parquet" if path.is_dir() else path
        if not path.exists():
            raise InputError(f"attribution scores {path}: no such file; pass an attribution directory")
        scores = pd.read_parquet(path)
    if "pair_id" not in scores.columns or "rank" not in scores.columns:
        raise InputError("attribution scores need pair_id and rank columns (from `alignscope attribute`)")
    return scores.sort_values("rank")["pair_id"].astype(str).tolist()


def curate(pairs: Sequence[Any], scores: pd.DataFrame | Artefact | str | Path, drop_top: int,
           random_k: int | None = None, seed: int = 0) -> Curation:
    """Drop the ``drop_top`` highest-ranked pairs; with ``random_k``, also a seeded random-drop control."""
    ids = [str(p.id) for p in pairs]
    if not 0 < drop_top < len(ids):
        raise InputError(f"--drop-top {drop_top}: must be between 1 and {len(ids) - 1} (the data has {len(ids)} pairs)")
    known = set(ids)
    ranked = [i for i in _ranked_ids(scores) if i in known]
    if len(ranked) < drop_top:
        raise InputError(f"--drop-top {drop_top}: only {len(ranked)} of the data's pairs have attribution scores")
    dropped = ranked[:drop_top]
    drop = set(dropped)
    kept = [p for p in pairs if str(p.id) not in drop]
    control_kept = control_dropped = None
    if random_k is not None:
        if not 0 < random_k < len(ids):
            raise InputError(f"random_k {random_k}: must be between 1 and {len(ids) - 1}")
        control_dropped = random.Random(f"curate:{seed}:{random_k}").sample(ids, random_k)
        drop = set(control_dropped)
        control_kept = [p for p in pairs if str(p.id) not in drop]
    return Curation(kept, dropped, control_kept, control_dropped)


def attribution_pairs(run: RunDir | str | Path, attribution: str | Path) -> tuple[Path, list[Any]]:
    """(attribution directory, the training pairs of the stage it explains)."""
    path, stage = attribution_stage(run, attribution)
    return path, stage_pairs(stage)


def attribution_stage(run: RunDir | str | Path, attribution: str | Path) -> tuple[Path, Any]:
    """(attribution directory, the stage it explains)."""
    import json

    run = run if isinstance(run, RunDir) else RunDir(run)
    candidates = [Path(attribution), run.root / ATTRIBUTION_STAGE / str(attribution)]
    path = next((c for c in candidates if (c / "summary.json").exists() and (c / "scores.parquet").exists()), None)
    if path is None:
        raise InputError(f"--attribution {attribution}: no finished attribution there (looked in "
                         f"{' and '.join(str(c) for c in candidates)}); pass its directory or key")
    summary = json.loads((path / "summary.json").read_text())
    stage_dirs = [run.root / "align" / summary.get("align_key", ""), Path(summary.get("stage", ""))]
    stage = next((s for s in stage_dirs if (s / "summary.json").exists()), None)
    if stage is None:
        raise InputError(f"attribution {path}: its stage {summary.get('align_key')} is not in {run.root}/align; "
                         "pass the run directory the attribution was made from")
    return path, resolve_stage(run, stage)


def zero_loss_stage(stage: Any, dropped: Sequence[str]) -> Any:
    """The stage's own config with ``dropped`` given zero loss: retraining it is the leave-k-out
    counterfactual with the data, order and batches unchanged (see ``ZeroLossPairs``)."""
    from alignscope.align.config import StageConfig

    try:
        return StageConfig(**stage.summary["config"]).with_zero_loss(dropped)
    except ValueError as exc:
        reason = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise InputError(f"stage {stage.path}: {reason.removeprefix('Value error, ')}; retrain without the "
                         "pairs instead (curate without --zero-loss)") from None
