"""Linear datamodeling score (LDS): do attribution scores predict what retraining on subsets does?

Planted-pair recovery needs ground truth; curation tests one drop. LDS (Park et al., TRAK) asks the
general question on the data as it is: retrain the stage on ``M`` random subsets (each a
``fraction`` of the pairs, same recipe and seed), evaluate the attribution's own measurement
``f(θ) = Σ weight × log p_θ(continuation | context)`` at each retrained policy, and correlate the
actual values with each estimator's prediction ``Σ_{i ∈ S} score_i`` (Spearman, across subsets).
Under the sign convention (positive = up-weighting the pair raises ``f``, i.e. moves the metric
towards worse), a good estimator gives a positive LDS.

It costs ``M`` trainings, so it runs only when asked (``alignscope attribute --lds M``). Every
retrained stage is an ordinary cached stage of the run directory, so an interrupted LDS resumes.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignscope.errors import InputError
from alignscope.store import Artefact, RunDir, atomic_write_json, atomic_write_parquet

LDS_STAGE = "lds"


def linear_datamodeling_score(run: RunDir | str | Path, attribution: str | Path, *, subsets: int = 8,
                              fraction: float = 0.5, seed: int = 0, batch_tokens: int = 4096) -> Artefact:
    """Retrain on ``subsets`` random subsets and score how well each estimator predicted ``f``.

    Returns the ``RUN/lds/<key>/`` artefact: ``subsets.parquet`` (one row per subset: its size,
    the measured ``f`` and every estimator's prediction) and ``summary.json`` (LDS per estimator).
    """
    from alignscope.align import StageConfig, train_stage
    from alignscope.attribute.core import _logprobs, attribution_pairs, resolve_stage
    from alignscope.models.requests import ScoreRequest

    check_lds_settings(subsets, fraction)
    run = run if isinstance(run, RunDir) else RunDir(run)
    path, pairs = attribution_pairs(run, attribution)
    summary = json.loads((path / "summary.json").read_text())
    inputs = {"stage": LDS_STAGE, "attribution": path.name, "subsets": subsets, "fraction": fraction, "seed": seed}
    found = run.find(LDS_STAGE, inputs)
    if found is not None:
        return found

    stage = resolve_stage(run, summary["stage"])
    config = StageConfig.model_validate({**stage.summary["config"], "tracin_snapshots": 0})
    scores = pd.read_parquet(path / "scores.parquet").set_index("pair_id")
    # every linear score, and the default estimator's chosen / rejected parts (which part predicts
    # retraining is an open question for DPO: BENCHMARKS.md)
    predictors = {c.removeprefix("score_"): c for c in scores.columns
                  if c.startswith(("score_", "chosen_", "rejected_")) and c != "score_self_influence"}
    measurement = pd.read_parquet(path / "measurement.parquet")
    requests = [ScoreRequest(context=r.context, continuation=r.continuation, chat=bool(r.chat))
                for r in measurement.itertuples()]
    weights = measurement["weight"].to_numpy(float)
    dtype = summary.get("dtype") or stage.summary.get("precision", {}).get("weights", "float32")

    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * len(pairs)))
    rows = []
    for m in range(subsets):
        keep = np.sort(rng.choice(len(pairs), size=size, replace=False))
        subset = [pairs[i] for i in keep]
        result = train_stage(stage.start_model, config, subset, run)
        lm = result.load(dtype=dtype)
        value = float(np.dot(weights, _logprobs(lm, requests, batch_tokens)))
        del lm
        gc.collect()
        ids = [str(p.id) for p in subset]
        row: dict[str, Any] = {"subset": m, "n_pairs": len(subset), "f": value, "stage": result.key,
                               "n_planted": int(sum(bool(p.planted) for p in subset))}
        for name, column in predictors.items():
            row[f"predicted_{name}"] = float(scores.loc[ids, column].sum())
        rows.append(row)
    table = pd.DataFrame(rows)
    lds = {name: _spearman(table[f"predicted_{name}"].to_numpy(), table["f"].to_numpy()) for name in predictors}
    with run.build(LDS_STAGE, inputs) as scratch:
        atomic_write_parquet(scratch / "subsets.parquet", table)
        atomic_write_json(scratch / "summary.json", {
            "attribution": str(path), "subsets": subsets, "fraction": fraction, "seed": seed, "lds": lds,
            "definition": "Spearman correlation, across random subsets S of the training pairs, between "
                          "Σ_{i∈S} score_i and the measurement f after retraining the stage on S "
                          "(same recipe and seed); positive = the scores predict retraining"})
    found = run.find(LDS_STAGE, inputs)
    assert found is not None
    return found


def check_lds_settings(subsets: int, fraction: float) -> None:
    if subsets < 3:
        raise InputError(f"--lds {subsets}: a rank correlation needs at least 3 subsets (0 turns LDS off)")
    if not 0 < fraction < 1:
        raise InputError(f"--lds-fraction {fraction}: must be between 0 and 1 (exclusive), e.g. 0.5")


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (None when either side is constant: no ranking to compare)."""
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def default_scores(attribution: Path) -> tuple[str | None, pd.Series | None]:
    """An attribution's default estimator and its per-pair scores (index = pair id), if it stored them."""
    estimator = json.loads((attribution / "summary.json").read_text()).get("default_estimator")
    scores = pd.read_parquet(attribution / "scores.parquet").set_index("pair_id")
    column = f"score_{estimator}"
    return (estimator, scores[column].astype(float)) if estimator and column in scores else (None, None)


def predicted_fraction_removed(scores: pd.Series, dropped: Iterable[str], *, increase: float,
                               same_steps: bool) -> float | None:
    """The share of the aligned increase that dropping ``dropped`` should remove, if effects add up.

    This is the linear datamodel that LDS tests, calibrated to the one number we measured: the
    aligned increase is split over the training pairs in proportion to their ``scores`` (index =
    pair id), so a curated model trained on the kept pairs K keeps ``Σ_K s / Σ s`` of it. With
    ``same_steps`` the curated model sees each kept pair ``n / |K|`` times as often as the original
    stage did, which scales what it keeps by that factor. Comparing this prediction with the
    retrained share is the counterfactual check of the scores' *sizes*, not just their order.

    Returns None when ``Σ s`` is zero or has the opposite sign from ``increase``: the scores then do
    not account for the measured change, and a ratio would only look like a prediction.
    """
    total = float(scores.sum())
    if total == 0.0 or increase == 0.0 or (total > 0) != (increase > 0):
        return None
    drop = {str(i) for i in dropped}
    kept = scores[[str(i) not in drop for i in scores.index]]
    kept_share = float(kept.sum()) / total
    if same_steps:
        kept_share *= len(scores) / len(kept)
    return 1.0 - kept_share
