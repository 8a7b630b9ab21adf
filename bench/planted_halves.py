"""Do the planted pairs the scores rank low matter less? Retrain without each half of them.

The planted-pair AUC treats every planted pair as equally causal. This checks that assumption on a
finished study run: rank the planted pairs by the default estimator, retrain the attributed arm
without the top half and, separately, without the bottom half (same recipe, seed and number of
optimizer steps as the study's curation), re-audit the attributed metric, and put each retrained
share of the aligned increase beside the share the scores predict
(:func:`alignscope.attribute.validation.predicted_fraction_removed`). Two trainings per run.

    .venv/bin/python bench/planted_halves.py runs/bench-default5 [--k 16]

Writes ``bench/results/planted_halves-<run name>-k<k>.json``; the retrained stages and audits stay
in the run directory (``audits/planted_top<k>``, ``audits/planted_bottom<k>``), so a rerun is cache hits.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import pandas as pd

from alignscope.align.stage import train_recipe
from alignscope.attribute.core import explained_metric
from alignscope.attribute.validation import default_scores, predicted_fraction_removed
from alignscope.audit.runner import available_probes, compare
from alignscope.data.preferences import pairs_from_frame
from alignscope.store import atomic_write_json
from alignscope.study.config import StudyConfig
from alignscope.study.pipeline import _audit_model, _metric_value, _same_steps

RESULTS = Path(__file__).parent / "results"


def planted_halves(run: Path, k: int) -> list[dict]:
    record = json.loads((run / "study.json").read_text())
    config = StudyConfig(**record["config"])
    assert config.attribution is not None
    arm, probe = config.attributed_arm, config.attribution.probe
    metric = explained_metric(available_probes()[probe], config.attribution.metric)
    pairs = pairs_from_frame(pd.read_parquet(run / record["data"] / "pairs.parquet"))  # as the study stored them
    stages = config.stages(arm)
    stages = _same_steps(stages, train_recipe(config.model, stages, pairs, run))  # a cache hit
    estimator, scores = default_scores(run / record["attribution"])
    assert scores is not None
    planted = {str(p.id) for p in pairs if p.planted}
    ranked = scores[scores.index.isin(planted)].sort_values(ascending=False).index.tolist()
    aligned = _metric_value(run / "audits" / arm, probe, metric)
    increase = aligned - _metric_value(run / "audits" / "base", probe, metric)
    rows = []
    for half, dropped in (("top", ranked[:k]), ("bottom", ranked[-k:])):
        label = f"planted_{half}{k}"
        kept = [p for p in pairs if str(p.id) not in set(dropped)]
        result = train_recipe(config.model, stages, kept, run)[-1]
        lm = result.load(dtype=config.dtype)
        _audit_model(lm, config, pairs, [probe], run / "audits" / label)
        del lm
        gc.collect()
        value = _metric_value(run / "audits" / label, probe, metric)
        table = compare(run / "audits" / arm, run / "audits" / label, seed=config.seed)
        row = table[(table["probe"] == probe) & (table["metric"] == metric)].iloc[0]
        rows.append({"run": str(run), "drop": label, "estimator": estimator, "metric": f"{probe}/{metric}",
                     "change": value - aligned, "change_ci": [float(row["ci_low"]), float(row["ci_high"])],
                     "p": float(row["p_value"]), "retrained_fraction_removed": (aligned - value) / increase,
                     "predicted_fraction_removed": predicted_fraction_removed(scores, dropped, increase=increase,
                                                                              same_steps=True),
                     "dropped": dropped, "stage": str(result.path)})
        print(f"{run.name} {label}: change {value - aligned:+.3f} "
              f"(CI {row['ci_low']:+.3f}, {row['ci_high']:+.3f}), removed {rows[-1]['retrained_fraction_removed']:.0%}, "
              f"predicted {rows[-1]['predicted_fraction_removed']:.0%}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished study run directories with planted pairs")
    parser.add_argument("--k", type=int, default=16, help="planted pairs per half (default 16 of the default 32)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for run in args.runs:
        atomic_write_json(RESULTS / f"planted_halves-{run.name}-k{args.k}.json", planted_halves(run, args.k))


if __name__ == "__main__":
    main()
