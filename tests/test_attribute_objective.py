"""The objective attribution differentiates is the loss TRL trains with, for every method it supports.

Each stage trains two steps on one batch holding every pair, with a TracIn snapshot of the adapter
before each step. TRL logs each step's batch loss; attribution's per-pair losses at the snapshot
taken before that step, combined the way the trainer averages them, must give the same number.
This checks, per method, the tokenisation (e.g. ORPO and CPO append an EOS token to each reply),
the reference, the loss formula (label smoothing, SimPO's margin, per-token averaging, KTO's KL
baseline) and how the batch is normalised.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_attribute_gradients import pairs

from alignscope.align import StageConfig, stage_reference, train_stage
from alignscope.attribute.gradients import collect_pair_gradients
from alignscope.attribute.objective import objective_from_summary
from alignscope.store import RunDir

N_PAIRS = 6
CASES = {  # settings that change the formula are set away from their defaults where there is one
    "sft": dict(method="sft"),
    "dpo": dict(method="dpo", beta=0.5),
    "ipo": dict(method="ipo", beta=0.5),
    "dpo-mixed": dict(method="dpo", beta=0.5, loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 0.3]),
    "orpo": dict(method="orpo", beta=0.5),
    "simpo": dict(method="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1),
    "kto": dict(method="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=0.1),  # with its KL baseline
    "kto-apo": dict(method="kto", beta=0.5, loss_type="apo_zero_unpaired", desirable_weight=1.0,
                    undesirable_weight=1.5),
}


def trl_batch_loss(method: str, table) -> float:
    """How TRL averages per-pair losses over a batch holding every pair (see each trainer)."""
    if method == "sft":  # token mean over the batch; the per-pair loss is the reply's summed NLL
        return float(table["loss"].sum() / table["tokens_chosen"].sum())
    if method == "kto":  # one desirable and one undesirable example per pair, mean over examples
        return float(table["loss"].sum() / (2 * len(table)))
    return float(table["loss"].mean())


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_attributed_loss_is_the_loss_trl_logs(tiny_model_dir, tmp_path, case):
    settings = CASES[case]
    rows_per_step = N_PAIRS * (2 if settings["method"] == "kto" else 1)
    stage = StageConfig(**settings, max_steps=2, per_device_train_batch_size=rows_per_step, max_length=40,
                        dtype="float32", learning_rate=5e-3, save_steps=50, tracin_snapshots=2)
    data = pairs(N_PAIRS)
    result = train_stage(str(tiny_model_dir), stage, data, tmp_path / "run")
    logged = {row["step"]: row["loss"] for row in map(json.loads, (result.path / "logs.jsonl").read_text().splitlines())
              if "loss" in row}
    objective = objective_from_summary(result.summary)
    reference = stage_reference(result.path) if objective.needs_reference else None
    checked = []
    for step in (0, 1):  # the snapshot before optimizer step `step` gives the loss logged at step + 1
        lm = result.load_snapshot(result.path / "snapshots" / f"step-{step}", dtype="float32", device="cpu")
        gs = collect_pair_gradients(lm, data, objective, run=RunDir(tmp_path / f"g{step}"), inputs={"step": step},
                                    max_length=40, truncation_mode=stage.truncation_mode, reference=reference,
                                    project_dim=16, seed=0)
        ours = trl_batch_loss(settings["method"], gs.table)
        assert ours == pytest.approx(logged[step + 1], abs=2e-4, rel=1e-4), (step, ours, logged)
        checked.append(ours)
    assert abs(checked[1] - checked[0]) > 1e-3  # the update moved the loss, so step 2 checks a trained policy
    if case == "kto":  # the KL baseline was not 0 where it was checked, so it took part
        assert gs.table["kl_baseline"].iloc[0] > 1e-4


@pytest.mark.parametrize("case", ["orpo", "simpo"])
def test_orpo_and_simpo_stages_are_attributed_with_every_part_reported(tiny_model_dir, tmp_path, case):
    """End to end through `attribute`: the parts of the default score add up to it, and ORPO's
    prompt NLL is a part of its own (the chosen sequence's prompt tokens are trained on too)."""
    from test_attribute import EchoProbe, planted_pairs

    from alignscope.attribute import attribute

    stage = StageConfig(**CASES[case], max_steps=2, per_device_train_batch_size=4, max_length=48, dtype="float32",
                        learning_rate=5e-3, save_steps=50)
    result = train_stage(str(tiny_model_dir), stage, planted_pairs(), tmp_path)
    artefact = attribute(tmp_path, result.path, EchoProbe(), methods=["gradsim"])
    summary = json.loads(artefact.file("summary.json").read_text())
    scores = pd.read_parquet(artefact.file("scores.parquet"))
    default = summary["default_estimator"]
    parts = ["chosen", "rejected", "prompt"] if case == "orpo" else ["chosen", "rejected"]
    assert [c for c in scores.columns if c.endswith(f"_{default}") and not c.startswith("score_")] == \
        [f"{part}_{default}" for part in parts]
    total = sum(scores[f"{part}_{default}"] for part in parts)
    assert np.allclose(total, scores[f"score_{default}"], atol=1e-9)
    assert np.abs(scores[f"{parts[-1]}_{default}"]).max() > 0  # the last part is not a column of zeros
