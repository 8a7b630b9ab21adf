"""Sections read from the study's own artefacts: provenance, training curves, attribution, curation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from alignscope.report import plots
from alignscope.report.blocks import flatten, frame_table, guarded, kv_table, not_run
from alignscope.report.model import Column, Plot, Section, Table, Text
from alignscope.report.sources import STUDY_INDEX, MissingArtefact, RunSources

TRAINING_METRICS = ("loss", "rewards/margins", "rewards/accuracies")
LOG_FILES = ("logs.jsonl", "log.jsonl")
TOP_PAIRS = 10


# --------------------------------------------------------------------------- provenance
@guarded("provenance", "Provenance")
def provenance(sources: RunSources) -> Section:
    """Where every result came from: software versions, model fingerprints, configs, stage timings."""
    section = Section("provenance", "Provenance", intro=(
        "Every number below is copied from a file in the run directory; report.json lists each block's "
        "source file."))
    if sources.is_study:
        section.parts.extend(_study_provenance(sources))
    else:
        section.parts.extend(_audit_run_provenance(sources))
    audit_table = _audit_artefacts(sources)
    if audit_table.rows:
        section.parts.append(audit_table)
    return section


def _study_provenance(sources: RunSources) -> list[Any]:
    study = sources.study or {}
    run = {k: study.get(k) for k in ("started_at", "finished_at", "seconds", "quick") if k in study}
    parts: list[Any] = [kv_table("Study run", {**run, "models": study.get("models", {})}, [STUDY_INDEX])]
    if study.get("versions"):
        parts.append(kv_table("Software versions", study["versions"], [STUDY_INDEX], key="package"))
    stages = study.get("stages") or []
    if stages:
        frame = pd.DataFrame(stages)
        parts.append(frame_table("Stages (seconds: wall time of this invocation; cached stages cost ~0)", frame,
                                 ["name", "status", "seconds", ("artefact", "code")], [STUDY_INDEX]))
    parts.extend(_data_summary(sources))
    if "config" in study:
        parts.append(Text("Study configuration (validated)", json.dumps(study["config"], indent=2,
                                                                        ensure_ascii=False), [STUDY_INDEX]))
    return parts


def _data_summary(sources: RunSources) -> list[Any]:
    data = sources.entry("data")
    if not data:
        return []
    try:
        summary = sources.json(f"{data}/summary.json")
    except MissingArtefact as exc:
        return [Text("Training data", f"Not shown: {exc}.", [STUDY_INDEX])]
    return [kv_table("Training data", summary, [f"{Path(data).as_posix()}/summary.json"])]


def _audit_run_provenance(sources: RunSources) -> list[Any]:
    manifest = sources.json(sources.root / "manifest.json")
    parts: list[Any] = []
    if manifest.get("versions"):
        parts.append(kv_table("Software versions", manifest["versions"], ["manifest.json"], key="package"))
    rows = [[stage, entry.get("finished"), entry.get("path")] for stage, entry in manifest.get("artefacts", {}).items()]
    parts.append(Table("Artefacts in the manifest", [Column("stage"), Column("finished"), Column("path", "code")],
                       rows, ["manifest.json"]))
    return parts


def _audit_artefacts(sources: RunSources) -> Table:
    """Per model and probe: the artefact, the model fingerprint it was audited on, items and time."""
    rows, used = [], []
    for model, probes in sources.audits.items():
        for probe, artefact in probes.items():
            summary = sources.audit_summary(artefact)
            m = summary.get("model", {})
            rows.append([model, probe, sources.rel(artefact.path), m.get("spec"), m.get("adapter"),
                         m.get("fingerprint"), m.get("dtype"), summary.get("n_items"), summary.get("limit"),
                         summary.get("seconds")])
            used.append(sources.rel(artefact.file("summary.json")))
    columns = [Column("model"), Column("probe"), Column("artefact", "code"), Column("model spec", "code"),
               Column("adapter", "code"), Column("fingerprint", "code"), Column("dtype"), Column("items"),
               Column("limit"), Column("seconds")]
    return Table("Audits", columns, rows, used)


# --------------------------------------------------------------------------- training
@guarded("training", "Training curves")
def training(sources: RunSources) -> Section:
    """Loss, reward margin and reward accuracy per logged step of every aligned stage."""
    title = "Training curves"
    align = sources.entry("align")
    if not align:
        return not_run(sources, "training", title, "recorded no alignment", ", so there are no training logs")
    series: dict[str, dict[str, Any]] = {}
    rows, used = [], []
    for arm, paths in align.items():
        paths = _arm_stages(sources, paths)
        for i, rel in enumerate(paths):
            name = arm if len(paths) == 1 else f"{arm} · stage {i + 1}"
            summary, log_rel, records = _stage_files(sources, rel)
            used += [f"{rel}/summary.json", log_rel]
            series[name] = _curves(records)
            rows.append([name, summary.get("method"), summary.get("steps"), summary.get("epochs"),
                         summary.get("final_loss"), summary.get("n_pairs"), summary.get("train_time_s"),
                         summary.get("pairs_per_s"), summary.get("data_fingerprint")])
    metrics = [m for m in TRAINING_METRICS if any(s.get(m) for s in series.values())]
    section = Section("training", title)
    if metrics:
        data = {"metrics": metrics, "series": series}
        section.parts.append(Plot("plot-training-curves", "Logged training metrics per step (TRL's names; rewards are "
                                  "the implicit DPO rewards).", used, data,
                                  plots.training_curves("plot-training-curves", data)))
    else:
        section.parts.append(Text("Training logs", "The training logs hold no loss or reward records.", used))
    columns = [Column(c) for c in ("stage", "method", "steps", "epochs", "final loss", "pairs", "train seconds",
                                   "pairs/s")] + [Column("data fingerprint", "code")]
    section.parts.append(Table("Stage summaries", columns, rows, [u for u in used if u.endswith("summary.json")]))
    return section


def _arm_stages(sources: RunSources, final: str | list[str]) -> list[str]:
    """Every stage of an arm: the study's step entry lists them; ``align`` names only the last."""
    if not isinstance(final, str):
        return [str(p) for p in final]
    for step in (sources.study or {}).get("stages") or []:
        if isinstance(step, dict) and step.get("artefact") == final and isinstance(step.get("stages"), list):
            return [str(p) for p in step["stages"]]
    return [final]


def _stage_files(sources: RunSources, rel: str) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    summary = sources.json(f"{rel}/summary.json")
    for name in LOG_FILES:
        path = sources.path(f"{rel}/{name}")
        if path.is_file():
            return summary, sources.rel(path), sources.jsonl(path)
    raise MissingArtefact(f"{rel}/{LOG_FILES[0]} is missing")


def _curves(records: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    for metric in TRAINING_METRICS:
        points = [(r["step"], r[metric]) for r in records if r.get(metric) is not None and "step" in r]
        if points:
            out[metric] = {"step": [p[0] for p in points], "value": [p[1] for p in points]}
    return out


# --------------------------------------------------------------------------- attribution
@guarded("attribution", "Attribution: which training pairs did it")
def attribution(sources: RunSources) -> Section:
    """Top-ranked training pairs with their text, and how well each estimator recovers planted pairs."""
    title = "Attribution: which training pairs did it"
    rel = sources.entry("attribution")
    if not rel:
        return not_run(sources, "attribution", title, "did not run attribution")
    summary = sources.json(f"{rel}/summary.json")
    scores = sources.parquet(f"{rel}/scores.parquet")
    summary_src, scores_src = f"{rel}/summary.json", f"{rel}/scores.parquet"
    estimators = [c[len("score_"):] for c in scores.columns if c.startswith("score_")]
    default = summary.get("default_estimator") or summary.get("default") or (estimators[0] if estimators else None)
    section = Section("attribution", title, intro=str(summary.get("sign_convention") or (
        "A positive score means up-weighting the pair moves the metric in the direction the probe calls worse.")))
    section.parts.extend(_recovery_tables(summary, summary_src))
    details = {k: summary[k] for k in ("method", "measurement", "gradients", "n_pairs", "timings") if k in summary}
    if details:
        section.parts.append(kv_table("What was explained, and timings (seconds)", details, [summary_src]))
    if "planted" in scores and estimators:
        data = {"estimators": estimators, "planted": scores["planted"].astype(bool).tolist(),
                "pair_id": scores["pair_id"].astype(str).tolist() if "pair_id" in scores else [],
                "scores": {e: scores[f"score_{e}"].tolist() for e in estimators}}
        section.parts.append(Plot("plot-attribution-recovery", "Every training pair's score under each estimator; "
                                  "planted pairs (known ground truth) should sit at the high end.", [scores_src], data,
                                  plots.recovery("plot-attribution-recovery", data)))
    section.parts.append(_top_pairs(scores, default, scores_src, summary.get("ground_truth")))
    return section


def _recovery_tables(summary: dict[str, Any], source: str) -> list[Table]:
    """Per-estimator recovery (AUC, recall@k, …) of the planted pairs and, when the measurement has
    another ground truth (e.g. ``canary``), of those pairs too, as stored, whatever fields they have."""
    truth = summary.get("ground_truth")
    kinds = ["planted"] + ([truth] if isinstance(truth, str) and truth != "planted" else [])
    tables = []
    for kind in kinds:
        found = summary.get(kind)
        per = found.get("estimators") if isinstance(found, dict) else None
        if not isinstance(per, dict) or not per:
            continue
        fields = list(dict.fromkeys(k for stats in per.values() for k, _ in flatten(stats)))
        rows = [[name, *[dict(flatten(stats)).get(f) for f in fields]] for name, stats in per.items()]
        k, n = found.get("k"), found.get("n_planted", found.get("n"))
        role = ("the ground truth of this measurement" if kind == truth else
                "planted for planted_bias, not this measurement's ground truth" if truth is not None else None)
        caption = (f"{kind.capitalize()}-pair recovery per estimator" + (f" (k = {k}, {kind} pairs = {n})"
                                                                          if k is not None else "")
                   + (f"; {role}" if role else ""))
        tables.append(Table(caption, [Column("estimator")] + [Column(f) for f in fields], rows, [source]))
    return tables


def _top_pairs(scores: pd.DataFrame, default: str | None, source: str, ground_truth: Any = None) -> Table:
    column = f"score_{default}" if default and f"score_{default}" in scores else None
    ordered = scores.sort_values("rank", kind="stable") if "rank" in scores else (
        scores.sort_values(column, ascending=False, kind="stable") if column else scores)
    own = ground_truth if isinstance(ground_truth, str) and ground_truth != "planted" else None
    truth = [own] if own in scores else []  # the measurement's own ground-truth labels (e.g. canary), if any
    scored = [column] if column else []
    columns: list[Any] = ["rank", "pair_id", "planted", *truth, "group", *scored, "loss", "margin"]
    columns += [("prompt", "longtext"), ("chosen", "longtext"), ("rejected", "longtext")]
    return frame_table(f"Top {TOP_PAIRS} training pairs ({default or 'stored order'})", ordered.head(TOP_PAIRS),
                       columns, [source])


# --------------------------------------------------------------------------- curation
@guarded("curation", "Curation: drop the top-k pairs and re-align")
def curation(sources: RunSources) -> Section:
    """Metric change after dropping the top-k attributed pairs versus k random pairs."""
    title = "Curation: drop the top-k pairs and re-align"
    rel = sources.entry("curation")
    if not rel:
        return not_run(sources, "curation", title, "did not run curation")
    curve = sources.parquet(f"{rel}/curve.parquet")
    source = f"{rel}/curve.parquet"
    data = {"metrics": [str(m) for m in dict.fromkeys(curve["metric"])], "series": _curation_series(curve)}
    section = Section("curation", title, intro=(
        "Counterfactual re-alignment: if the attributed pairs caused the change, dropping them should undo "
        "much more of it than dropping as many random pairs. predicted_fraction_removed is what the scores "
        "predict if pair effects add up; where it matches the retrained share, the scores' sizes are right, "
        "not only their order. The summary's definition says how each curated model was retrained (retrain: "
        "drop, or zero_loss: every pair kept in its batch with the dropped pairs' loss set to 0)."))
    section.parts.append(Plot("plot-curation-curve", "Metric change (re-aligned without the dropped pairs, or with "
                              "their loss zeroed, minus aligned on all pairs) against the number of pairs dropped.",
                              [source], data, plots.curation("plot-curation-curve", data)))
    section.parts.append(frame_table("Curation curve", curve.sort_values(["metric", "arm", "k"], kind="stable"), [
        "metric", "arm", "k", "random_seed", "value", "change", "change_ci_low", "change_ci_high", ("change_p", "p"),
        "fraction_of_increase_removed", "predicted_fraction_removed", "planted_dropped",
        *[c for c in curve.columns if c.endswith("_dropped") and c != "planted_dropped"], "label"], [source]))
    try:
        section.parts.append(kv_table("Curation summary", sources.json(f"{rel}/summary.json"), [f"{rel}/summary.json"]))
    except MissingArtefact:
        pass
    return section


def _curation_series(curve: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (metric, arm), part in curve.groupby(["metric", "arm"], sort=False):
        part = part.sort_values("k", kind="stable")
        entry = {"k": part["k"].tolist(), "change": part["change"].tolist(), "line": bool(part["k"].is_unique)}
        if {"change_ci_low", "change_ci_high"} <= set(part.columns):
            entry.update(ci_low=part["change_ci_low"].tolist(), ci_high=part["change_ci_high"].tolist())
        out.setdefault(str(metric), {})[str(arm)] = entry
    return out


STUDY_SECTIONS = (provenance, training)
ATTRIBUTION_SECTIONS = (attribution, curation)
