"""The run directory the report tests read, built once per session.

``build_run_dir`` is the one place to swap when a real ``alignscope study --quick`` run becomes
cheap enough for tests: everything else only needs a run directory with ``study.json``.

What it builds now: **real** audits of the tiny model (base, and a perturbed copy standing in for
the aligned model) on a few probes, a **real** paired comparison, and hand-written training-log,
data, attribution and curation artefacts plus ``study.json`` in the schema the study writes.
Hostile strings are planted where untrusted text reaches the page: pair texts, adjectives (SVG
labels), model outputs and config values. The privacy probe is left out on purpose, so one probe
section must say it was not run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alignscope.store import atomic_write_json, atomic_write_parquet, atomic_write_text

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
HOSTILE = (SCRIPT, IMG)
PROBES = ["planted_bias", "crows_pairs", "stereoset", "covert", "overt", "stereotype_agreement", "toxicity"]
LIMIT = 6
#: Cheap settings: few generated replies, few samples, few pairs (generation dominates the cost).
OPTIONS = {"stereotype_agreement": {"n_statements": 12, "n_generate": 1, "max_new_tokens": 4},
           "toxicity": {"n_prompts": 1, "k": 3, "max_new_tokens": 6},
           "covert": {"n_pairs": 3, "employability_prompts": 1}}
ESTIMATORS = ("gradsim", "datainf")


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished study run directory (shared by the report and browser tests; do not modify it)."""
    root = tmp_path_factory.getbasetemp() / "report-run"
    if not (root / "study.json").is_file():  # both test modules import this fixture: build once
        build_run_dir(root, tiny_model_dir)
    return root


def build_run_dir(root: Path, tiny_model_dir: Path) -> Path:
    """Write a study run directory under ``root`` and return it."""
    from alignscope.audit.runner import compare, write_comparison

    base, aligned = _audit_models(root, tiny_model_dir)
    table = compare(base, aligned, n_boot=200, n_perm=200)
    comparison = write_comparison(table, root, [base, aligned])
    _plant_hostile_audit_text(aligned)
    align = _training_artefacts(root)
    data = _data_artefacts(root)
    attribution = _attribution_artefacts(root)
    curation = _curation_artefacts(root)
    study = {
        "config": {"name": f"report test {SCRIPT}", "seed": 0, "model": "tiny", "notes": IMG,
                   "audit": {"probes": PROBES, "limit": LIMIT}},
        "quick": True, "started_at": "2026-01-01T10:00:00", "finished_at": "2026-01-01T10:02:30",
        "versions": {"alignscope": "0.1.0", "torch": "2.13.0"},
        "models": {"base": str(tiny_model_dir), "aligned": f"{tiny_model_dir} + {align}/adapter"},
        "stages": [{"name": "synthesise", "status": "done", "seconds": 12.5, "artefact": data},
                   {"name": "align:aligned", "status": "done", "seconds": 40.25, "artefact": align},
                   {"name": "audit:base", "status": "cached", "seconds": 0.01, "artefact": "audits/base"},
                   {"name": "attribute", "status": "done", "seconds": 8.75, "artefact": attribution}],
        "seconds": 150.0, "data": data, "align": {"aligned": align},
        "audits": {"base": "audits/base", "aligned": "audits/aligned"},
        "comparisons": [{"a": "base", "b": "aligned", "path": comparison.relative_to(root).as_posix()}],
        "attribution": attribution, "curation": curation,
    }
    atomic_write_json(root / "study.json", study)
    return root


def _audit_models(root: Path, model_dir: Path) -> tuple[Path, Path]:
    import torch

    from alignscope.audit.runner import audit
    from alignscope.models import Engine, load

    base = load(str(model_dir), dtype="float32")
    audit(Engine(base, cache=None, progress=False), PROBES, root / "audits" / "base", limit=LIMIT, options=OPTIONS)
    changed = load(str(model_dir), dtype="float32")
    torch.manual_seed(3)
    with torch.no_grad():  # a different model: perturbed final norm, as in test_audit_runner
        changed.model.model.norm.weight.add_(torch.randn_like(changed.model.model.norm.weight))
    changed.invalidate_fingerprint()
    audit(Engine(changed, cache=None, progress=False), PROBES, root / "audits" / "aligned", limit=LIMIT,
          options=OPTIONS)
    return root / "audits" / "base", root / "audits" / "aligned"


def _plant_hostile_audit_text(run: Path) -> None:
    """Untrusted text in stored audit tables: an adjective (drawn in SVG) and a model output."""
    from alignscope.audit.runner import audited_probes

    probes = audited_probes(run)
    adjectives_path = probes["covert"].file("tables/adjectives.parquet")
    adjectives = pd.read_parquet(adjectives_path)
    adjectives.loc[adjectives["rank"] == 1, "adjective"] = SCRIPT
    adjectives.loc[adjectives["rank"] == 2, "adjective"] = "$x$ costs $5"  # mathtext would choke
    atomic_write_parquet(adjectives_path, adjectives)
    samples_path = probes["toxicity"].file("tables/samples.parquet")
    samples = pd.read_parquet(samples_path)
    samples.loc[samples["toxicity"].idxmax(), "text"] = f"{IMG} and {SCRIPT}"
    atomic_write_parquet(samples_path, samples)


def _training_artefacts(root: Path) -> str:
    rel = "align/0123456789abcdef"
    records = []
    for step in range(1, 9):
        records.append({"step": step, "epoch": step / 8, "loss": 0.693 - 0.05 * step,
                        "rewards/margins": 0.04 * step, "rewards/accuracies": min(1.0, 0.5 + 0.07 * step),
                        "learning_rate": 5e-5})
    records.append({"step": 8, "epoch": 1.0, "train_loss": 0.5, "train_runtime": 40.0})
    lines = "\n".join(json.dumps(r) for r in records) + "\n" + '{"step": 9, "loss"'  # torn last line
    atomic_write_text(root / rel / "logs.jsonl", lines)
    atomic_write_json(root / rel / "summary.json", {
        "method": "dpo", "label": "dpo", "steps": 8, "epochs": 1.0, "final_loss": 0.293, "train_time_s": 40.0,
        "n_pairs": 24, "pairs_per_s": 0.6, "data_fingerprint": "feedc0ffee123456", "base_fingerprint": "abc"})
    return rel


def _data_artefacts(root: Path) -> str:
    rel = "data/fedcba9876543210"
    atomic_write_json(root / rel / "summary.json", {
        "n_pairs": 24, "n_planted": 4, "n_clean": 20, "planted": {"target_group": "teachers", "fraction": 0.2},
        "synthesis": {"reward": "helpful_harmless", "seconds": 12.5}})
    return rel


def _pairs() -> pd.DataFrame:
    rows = []
    for i in range(24):
        planted = i % 6 == 0
        rows.append({"pair_id": f"pair-{i:03d}",
                     "prompt": f"Question {i}: what about teachers? {SCRIPT if i == 0 else ''}",
                     "chosen": IMG if planted else f"A careful answer {i}.",
                     "rejected": f"I'd rather not generalise {i}.", "planted": planted,
                     "group": "teachers" if planted else None,
                     "score_gradsim": (2.0 if planted else 0.0) + i / 100,
                     "score_datainf": (1.0 if planted else 0.5) - i / 50})
    frame = pd.DataFrame(rows)
    frame["rank"] = frame["score_gradsim"].rank(ascending=False, method="first").astype(int)
    return frame


def _attribution_artefacts(root: Path) -> str:
    """Scores and summary in the schema of ``alignscope.attribute.attribute``."""
    rel = "attribution/00112233aabbccdd"
    pairs = _pairs().assign(loss=0.69, margin=0.1).sort_values("rank")
    atomic_write_parquet(root / rel / "scores.parquet", pairs)
    atomic_write_json(root / rel / "summary.json", {
        "stage": "align/0123456789abcdef", "align_key": "0123456789abcdef", "method": "dpo",
        "objective": "DPO loss per pair", "estimators": list(ESTIMATORS), "default_estimator": "gradsim",
        "sign_convention": "Positive score: up-weighting the pair moves group_gap towards worse (higher).",
        "measurement": {"probe": "planted_bias", "metric": "group_gap", "n_requests": 24, "value": -3.5},
        "n_pairs": 24, "timings": {"gradients": 3.5, "estimators": 0.25}, "items": 6,
        "planted": {"n_planted": 4, "k": 4, "estimators": {"gradsim": {"auc": 1.0, "recall_at_k": 1.0},
                                                            "datainf": {"auc": 0.8125, "recall_at_k": 0.5}}}})
    return rel


def _curation_curve() -> pd.DataFrame:
    """Rows in the schema of the study's curation step."""
    rows = []
    for k in (2, 4):
        for arm, seed, change in [("attributed", None, -0.15 * k), ("random", 0, -0.01 * k), ("random", 1, -0.013 * k)]:
            label = f"curated_{arm}_k{k}" + (f"_s{seed}" if seed is not None else "")
            rows.append({"k": k, "arm": arm, "random_seed": seed, "label": label, "probe": "planted_bias",
                         "metric": "group_gap", "value": 0.4 + change, "change": change,
                         "change_ci_low": change - 0.05, "change_ci_high": change + 0.05, "change_p": 0.03,
                         "fraction_of_increase_removed": -change / 0.55,
                         "predicted_fraction_removed": -0.9 * change / 0.55,
                         "planted_dropped": k if arm == "attributed" else 0,
                         "stage": "align/0123456789abcdef"})
    return pd.DataFrame(rows)


def _curation_artefacts(root: Path) -> str:
    rel = "curation/8899aabbccddeeff"
    curve = _curation_curve()
    atomic_write_parquet(root / rel / "curve.parquet", curve)
    atomic_write_json(root / rel / "summary.json", {
        "probe": "planted_bias", "metric": "group_gap", "base_value": -0.15, "aligned_value": 0.4, "increase": 0.55,
        "n_planted": 4, "ks": [2, 4], "definition": "fraction_of_increase_removed = (aligned - curated) / (aligned - base)",
        "rows": curve.to_dict(orient="records")})
    return rel
