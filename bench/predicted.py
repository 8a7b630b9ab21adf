"""Predicted vs retrained: how well each estimator's scores predict the study's curation retrains.

For every curated retrain in the given study run directories (top-k and random drops), compare the
share of the aligned increase the retrain removed with the share each score column predicts under
the additive model (:func:`alignscope.attribute.validation.predicted_fraction_removed`): every
estimator, and the chosen and rejected parts of the default one. No training: it reads the runs'
attribution scores and curation rows, and redraws each drop with the same ``curate`` call the study
made (checked against the stored count of planted pairs dropped).

    .venv/bin/python bench/predicted.py runs/bench-default5 runs/seed2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from alignscope.attribute.core import curate
from alignscope.attribute.validation import predicted_fraction_removed
from alignscope.data.preferences import pairs_from_frame


def retrains(run: Path) -> list[dict]:
    """One record per curated retrain: the dropped ids, the retrained share and the run's scores."""
    study = json.loads((run / "study.json").read_text())
    scores = pd.read_parquet(run / study["attribution"] / "scores.parquet")
    curation = json.loads((run / study["curation"] / "summary.json").read_text())
    pairs = pairs_from_frame(pd.read_parquet(run / study["data"] / "pairs.parquet"))
    planted = set(scores.loc[scores["planted"], "pair_id"])
    out = []
    for row in curation["rows"]:
        random_k = row["k"] if row["arm"] == "random" else None
        drop = curate(pairs, scores, row["k"], random_k=random_k, seed=row["random_seed"] or 0)
        dropped = drop.control_dropped if random_k else drop.dropped
        assert dropped is not None and len(planted & set(dropped)) == row["planted_dropped"], "not the study's drop"
        out.append({"run": str(run), "label": row["label"], "dropped": dropped, "scores": scores,
                    "increase": curation["increase"], "same_steps": curation.get("same_steps", False),
                    "retrained": row["fraction_of_increase_removed"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="study run directories with attribution and curation")
    parser.add_argument("--out", type=Path, default=Path("bench/results/predicted.json"))
    args = parser.parse_args()
    rows = [r for run in args.runs for r in retrains(run)]
    columns = [c for c in rows[0]["scores"].columns
               if c.startswith(("score_", "chosen_", "rejected_")) and c != "score_self_influence"]
    result: dict = {"runs": [str(r) for r in args.runs], "retrains": [[r["run"], r["label"]] for r in rows],
                    "retrained": [r["retrained"] for r in rows], "columns": {}}
    for column in columns:
        predicted = [predicted_fraction_removed(r["scores"].set_index("pair_id")[column].astype(float), r["dropped"],
                                                increase=r["increase"], same_steps=r["same_steps"]) for r in rows]
        entry: dict = {"predicted": predicted}
        if None not in predicted and len(rows) > 2:
            p, a = np.array(predicted), np.array(result["retrained"])
            entry.update(pearson=float(np.corrcoef(p, a)[0, 1]), spearman=float(spearmanr(p, a).statistic),
                         mean_abs_error=float(np.mean(np.abs(p - a))))
        result["columns"][column] = entry
        shown = " ".join("  n/a" if x is None else f"{x:+.2f}" for x in predicted)
        stats = (f"pearson {entry['pearson']:+.2f} spearman {entry['spearman']:+.2f} MAE {entry['mean_abs_error']:.2f}"
                 if "pearson" in entry else "no prediction (scores sum to zero or against the change)")
        print(f"{column:22s} {shown}   {stats}")
    print(f"{'retrained':22s} " + " ".join(f"{x:+.2f}" for x in result["retrained"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
