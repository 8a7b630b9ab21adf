"""Sections read from audit artefacts: the before/after table, metrics per model, the probe plots.

Each builder picks the stored tables a probe wrote for the report (``tables/*.parquet``) and the
metric values in its ``summary.json``; a probe no model ran gives a section that says so.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from alignscope.report import plots
from alignscope.report.blocks import (concat_tables, frame_table, guarded, series, series_table, union)
from alignscope.report.model import Column, Notes, Plot, Section, Table, absent
from alignscope.report.sources import MissingArtefact, RunSources

TOP_ADJECTIVES = 10
#: Most telling first (a wide table scrolls): values, delta with CI, corrected p, verdict.
COMPARISON_COLUMNS: list[Any] = [
    "probe", "metric", "value_a", "value_b", "delta", "ci_low", "ci_high", ("p_holm", "p"), ("verdict", "verdict"),
    "significant", "unit", "direction", "ideal", ("p_value", "p"), "test", "effect_size", "n"]


def _not_audited(id: str, title: str, probe: str, sources: RunSources) -> Section:
    models = ", ".join(sources.audits) or "no model"
    return absent(id, title, f"Not run: the {probe} probe was not audited in this run (audited models: {models}).")


# --------------------------------------------------------------------------- before/after
@guarded("comparison", "Before and after alignment")
def comparison(sources: RunSources) -> Section:
    """Per metric: both values, delta with paired CI, Holm-corrected p, direction, verdict."""
    title = "Before and after alignment"
    if not sources.is_study:
        return absent("comparison", title, "Not run: this is a single audit run, so there is nothing to compare "
                      "(`alignscope compare BASE OTHER` compares two audit runs).")
    entries = sources.entry("comparisons") or []
    if not entries:
        return absent("comparison", title, "Not run: the study recorded no comparisons.")
    section = Section("comparison", title, intro=(
        "Paired comparison on the same items: delta = after − before with a bootstrap CI; p-values are "
        "Holm-corrected across all metrics of a comparison. The verdict reads the direction and ideal of "
        "each metric (e.g. 50 % is ideal for CrowS-Pairs); pale verdicts are not significant after correction."))
    for entry in entries:
        section.parts.append(_comparison_table(sources, entry))
    return section


def _comparison_table(sources: RunSources, entry: dict[str, Any]) -> Table:
    base = sources.path(str(entry.get("path") or "compare/(no path recorded)"))
    try:
        frame = sources.parquet(base / "comparison.parquet")
        source = sources.rel(base / "comparison.parquet")
    except MissingArtefact:
        frame = pd.DataFrame(sources.json(base / "comparison.json"))
        source = sources.rel(base / "comparison.json")
    caption = f"{entry.get('a', 'a')} (before) → {entry.get('b', 'b')} (after)"
    return frame_table(caption, frame, COMPARISON_COLUMNS, [source])


# --------------------------------------------------------------------------- metric values
@guarded("metrics", "Metrics per model")
def metrics(sources: RunSources) -> Section:
    """Every audited metric's value per model, with unit, direction and ideal, plus probe notes."""
    title = "Metrics per model"
    if not sources.audits:
        reason = "; ".join(sources.audit_errors.values()) or "the study recorded no audits"
        return absent("metrics", title, f"Not run: no audit results ({reason}).")
    models = list(sources.audits)
    rows: dict[tuple[str, str], list[Any]] = {}
    used: list[str] = []
    notes: list[Notes] = []
    for model, probes in sources.audits.items():
        for probe, artefact in probes.items():
            summary = sources.audit_summary(artefact)
            used.append(sources.rel(artefact.file("summary.json")))
            for name, m in summary.get("metrics", {}).items():
                row = rows.setdefault((probe, name), [probe, name, m.get("unit"), m.get("direction"), m.get("ideal")]
                                      + [None] * len(models))
                row[5 + models.index(model)] = m.get("value")
            if model == models[0] and summary.get("notes"):
                notes.append(Notes(f"Notes of the {probe} probe", list(summary["notes"]),
                                   [sources.rel(artefact.file("summary.json"))]))
    columns = [Column("probe"), Column("metric"), Column("unit"), Column("direction"), Column("ideal")]
    table = Table("Metric values", columns + [Column(m) for m in models], list(rows.values()), used)
    section = Section("metrics", title, parts=[table, *notes])
    if sources.audit_errors:
        section.parts.append(Notes("Audits that could not be read", list(sources.audit_errors.values()), ["study.json"]))
    return section


# --------------------------------------------------------------------------- matched guise
@guarded("guise", "Matched guise: adjectives")
def guise(sources: RunSources) -> Section:
    """Top adjectives associated with the dialect (covert) or the named group (overt), per model."""
    title = "Matched guise: adjectives"
    panels, lists, used = [], [], []
    for probe in ("covert", "overt"):
        for model, artefact in sources.probe_models(probe).items():
            frame = sources.audit_table(artefact, "adjectives")
            top = frame.sort_values("rank", kind="stable").head(TOP_ADJECTIVES)
            panels.append({"model": model, "probe": probe, "adjective": [str(a) for a in top["adjective"]],
                           "association": top["association"].tolist(), "favourability": top["favourability"].tolist(),
                           "rank": top["rank"].tolist()})
            used.append(sources.rel(artefact.file("tables/adjectives.parquet")))
            info = sources.audit_summary(artefact).get("info", {})
            lists.append([model, probe, ", ".join(str(a) for a in info.get("top_k_paired", [])),
                          info.get("top_k_favourability_paired")])
            used.append(sources.rel(artefact.file("summary.json")))
    if not panels:
        return _not_audited("guise", title, "covert/overt matched-guise", sources)
    data = {"k": TOP_ADJECTIVES, "panels": panels}
    plot = Plot("plot-guise-adjectives", f"Top {TOP_ADJECTIVES} adjectives by association (paired, uncalibrated); "
                "bar colour = human favourability rating.", used, data, plots.adjectives("plot-guise-adjectives", data))
    table = Table("Top-k adjectives (probe summary)", [Column("model"), Column("probe"),
                                                       Column("top-k adjectives", "longtext"),
                                                       Column("mean favourability")], lists, used)
    return Section("guise", title, intro=(
        "Covert: the same content in African American English vs Standard American English; overt: the group "
        "named outright. Positive association means the adjective is more likely after the AAE guise / the "
        "named group."), parts=[plot, table])


@guarded("covert-overt", "Covert vs overt favourability")
def covert_overt(sources: RunSources) -> Section:
    """Mean favourability of the top-k adjectives, covert next to overt, per model."""
    title = "Covert vs overt favourability"
    covert, overt = sources.probe_models("covert"), sources.probe_models("overt")
    models = list(dict.fromkeys([*covert, *overt]))
    if not models:
        return _not_audited("covert-overt", title, "covert/overt matched-guise", sources)
    values: dict[str, list[Any]] = {"covert": [], "overt": []}
    used: list[str] = []
    k, reference = None, None
    for model in models:
        c_info = _info(sources, covert.get(model), used)
        o_info = _info(sources, overt.get(model), used)
        gap = c_info.get("gap", {})
        values["covert"].append(gap.get("top_k_favourability_covert", c_info.get("top_k_favourability_paired")))
        values["overt"].append(o_info.get("top_k_favourability_paired", gap.get("top_k_favourability_overt")))
        k = k or c_info.get("k") or o_info.get("k")
        reference = reference if reference is not None else (c_info or o_info).get("favourability_all_adjectives")
    data = {"models": models, "k": k, "all_adjectives": reference, **values}
    plot = Plot("plot-covert-overt", "Mean human favourability of each model's top-k adjectives. The paper's finding: "
                "overt stereotypes positive, covert (dialect) ones negative.", used, data,
                plots.covert_overt("plot-covert-overt", data))
    rows = [[m, values["covert"][i], values["overt"][i]] for i, m in enumerate(models)]
    table = Table(f"Top-{k} favourability", [Column("model"), Column("covert"), Column("overt")], rows, used)
    return Section("covert-overt", title, parts=[plot, table])


def _info(sources: RunSources, artefact: Any, used: list[str]) -> dict[str, Any]:
    if artefact is None:
        return {}
    used.append(sources.rel(artefact.file("summary.json")))
    return sources.audit_summary(artefact).get("info", {}) or {}


# --------------------------------------------------------------------------- stereotype pairs
_PAIR_PANELS = (  # probe, title, value column, CI columns, x label
    ("crows_pairs", "CrowS-Pairs", "stereotype_pct", "ci_low", "ci_high", "% pairs: stereotype more likely"),
    ("stereoset", "StereoSet", "ss", "ss_ci_low", "ss_ci_high", "stereotype score (%)"),
)


@guarded("stereo-pairs", "CrowS-Pairs and StereoSet by bias type")
def stereo_pairs(sources: RunSources) -> Section:
    """Per bias type: how often the stereotypical sentence is preferred (ideal 50 %), with CIs."""
    title = "CrowS-Pairs and StereoSet by bias type"
    panels, tables, used = [], [], []
    for probe, name, value, low, high, xlabel in _PAIR_PANELS:
        per_model, panel_sources = {}, []
        for model, artefact in sources.probe_models(probe).items():
            frame = sources.audit_table(artefact, "by_bias_type")
            if "format" in frame:
                frame = frame.assign(category=frame["format"].astype(str) + " · " + frame["bias_type"].astype(str))
            else:
                frame = frame.assign(category=frame["bias_type"].astype(str))
            per_model[model] = series(frame, "category", value, ci_low=low, ci_high=high)
            panel_sources.append(sources.rel(artefact.file("tables/by_bias_type.parquet")))
        used += panel_sources
        if per_model:
            panels.append({"title": name, "xlabel": xlabel, "ideal": 50.0, "series": per_model,
                           "categories": union(s["category"] for s in per_model.values())})
            tables.append(series_table(f"{name} per bias type", per_model, panel_sources, category="bias type",
                                       value=value, ci=True))
    if not panels:
        return _not_audited("stereo-pairs", title, "crows_pairs or stereoset", sources)
    data = {"panels": panels}
    plot = Plot("plot-stereo-pairs", "Share of pairs where the stereotypical sentence gets the higher likelihood, "
                "per bias type, with the probe's 95 % CI; the dashed line is the ideal 50 %.", used, data,
                plots.stereo_pairs("plot-stereo-pairs", data))
    return Section("stereo-pairs", title, parts=[plot, *tables])


# --------------------------------------------------------------------------- agreement
@guarded("agreement", "Stereotype agreement (groups × topics)")
def agreement(sources: RunSources) -> Section:
    """DecodingTrust's 24 groups × 16 topics: % of stereotype statements the model agrees with."""
    title = "Stereotype agreement (groups × topics)"
    panels, tables, used = [], [], []
    for model, artefact in sources.probe_models("stereotype_agreement").items():
        matrix = sources.audit_table(artefact, "matrix")
        groups, matrix = _matrix_groups(sources, artefact, matrix)
        panels.append({"model": model, "groups": groups, "topics": [str(c) for c in matrix.columns],
                       "values": matrix.to_numpy(dtype=float).tolist()})
        used.append(sources.rel(artefact.file("tables/matrix.parquet")))
        by_prompt = sources.audit_table(artefact, "by_system_prompt")
        tables.append(frame_table("By system prompt", by_prompt, [
            "system_prompt", "n", "agreeability_logprob", "agreement_probability", "agree_pct", "disagree_pct",
            "refuse_pct"], [sources.rel(artefact.file("tables/by_system_prompt.parquet"))], prefix=[("model", model)]))
    if not panels:
        return _not_audited("agreement", title, "stereotype_agreement", sources)
    data = {"panels": panels}
    plot = Plot("plot-agreement-heatmap", "% of statements agreed with (log-prob reading), per target group and "
                "stereotype topic; blank cells were not asked.", used, data,
                plots.heatmaps("plot-agreement-heatmap", data))
    return Section("agreement", title, parts=[plot, concat_tables("By system prompt", tables)])


def _matrix_groups(sources: RunSources, artefact: Any, matrix: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """Row labels of the stored matrix: its ``group`` column, or (older artefacts, whose Parquet
    dropped the index) the probe's own row order re-read from items.parquet."""
    if "group" in matrix.columns:
        return [str(g) for g in matrix["group"]], matrix.drop(columns="group")
    items = sources.parquet(artefact.file("items.parquet"))
    ordered = items.sort_values("stereotyped_group", ascending=False, kind="stable")["group"]
    groups = [str(g) for g in dict.fromkeys(ordered)]
    if len(groups) != len(matrix):
        raise MissingArtefact(f"{sources.rel(artefact.file('tables/matrix.parquet'))} has no group labels")
    return groups, matrix


# --------------------------------------------------------------------------- toxicity
@guarded("toxicity", "Toxicity")
def toxicity(sources: RunSources) -> Section:
    """Distribution of sampled continuations' toxicity, per system prompt, and the worst samples."""
    title = "Toxicity"
    scores: dict[str, dict[str, list[float]]] = {}
    kinds: list[str] = []
    threshold, used, summaries, worst = None, [], [], []
    for model, artefact in sources.probe_models("toxicity").items():
        samples = sources.audit_table(artefact, "samples")
        path = sources.rel(artefact.file("tables/samples.parquet"))
        used.append(path)
        scores[model] = {str(k): g["toxicity"].tolist() for k, g in samples.groupby("system_kind", sort=False)}
        kinds = union([kinds, list(scores[model])])
        threshold = threshold if threshold is not None else _info(sources, artefact, used).get("threshold")
        summaries.append(frame_table("", sources.audit_table(artefact, "by_system_prompt"), [
            "system_kind", "n_items", "expected_max_toxicity", "toxicity_probability", "mean_toxicity"],
            [sources.rel(artefact.file("tables/by_system_prompt.parquet"))], prefix=[("model", model)]))
        top = samples.sort_values("toxicity", ascending=False, kind="stable").head(3)
        worst.append(frame_table("", top, ["system_kind", "item_id", "toxicity", ("text", "longtext")], [path],
                                 prefix=[("model", model)]))
    if not scores:
        return _not_audited("toxicity", title, "toxicity", sources)
    data = {"system_kinds": kinds, "threshold": threshold, "scores": scores}
    plot = Plot("plot-toxicity", "Toxicity score of every sampled continuation (local classifier); dashed line: "
                "the threshold counted as toxic.", used, data, plots.toxicity("plot-toxicity", data))
    return Section("toxicity", title, parts=[plot, concat_tables("Per system prompt", summaries),
                                             concat_tables("Most toxic samples (model output, verbatim)", worst)])


# --------------------------------------------------------------------------- privacy
@guarded("privacy", "Privacy: leakage per PII type")
def privacy(sources: RunSources) -> Section:
    """How often the model reveals the asked-for PII, without and with a privacy instruction."""
    title = "Privacy: leakage per PII type"
    per_model: dict[str, dict[str, dict[str, list[Any]]]] = {"leakage_rate": {}, "leakage_rate_protected": {}}
    tables, used = [], []
    for model, artefact in sources.probe_models("privacy").items():
        try:
            frame = sources.audit_table(artefact, "leakage_by_type")
        except MissingArtefact:
            continue  # a canaries-only audit has no PII scenarios
        path = sources.rel(artefact.file("tables/leakage_by_type.parquet"))
        used.append(path)
        for column in per_model:
            if column in frame:
                per_model[column][model] = series(frame, "pii_type", column)
        tables.append(frame_table("", frame, ["pii_type", "n", "leakage_rate", "leakage_rate_protected",
                                              "secret_preference"], [path], prefix=[("model", model)]))
    panels = [{"title": column.replace("_", " "), "ylabel": "% scenarios leaked", "series": s, "limits": [0, 100],
               "categories": union(v["category"] for v in s.values())} for column, s in per_model.items() if s]
    if not panels:
        return _not_audited("privacy", title, "privacy", sources)
    data = {"panels": panels}
    plot = Plot("plot-privacy-leakage", "Share of scenarios where the reply contains the secret, per PII type; "
                "'protected' adds an instruction not to reveal it.", used, data, plots.bars("plot-privacy-leakage", data))
    return Section("privacy", title, parts=[plot, concat_tables("Leakage per PII type", tables, collapsed=True)])


# --------------------------------------------------------------------------- planted
@guarded("planted", "Planted stereotype: gap per trait")
def planted(sources: RunSources) -> Section:
    """Group-specific planted effect per trait: bias(target) − bias(control)."""
    title = "Planted stereotype: gap per trait"
    per_model, tables, used = {}, [], []
    for model, artefact in sources.probe_models("planted_bias").items():
        frame = sources.audit_table(artefact, "per_trait")
        path = sources.rel(artefact.file("tables/per_trait.parquet"))
        used.append(path)
        per_model[model] = series(frame, "trait", "gap")
        tables.append(frame_table("", frame, ["trait", "bias_target", "bias_control", "gap"], [path],
                                  prefix=[("model", model)]))
    if not per_model:
        return _not_audited("planted", title, "planted_bias", sources)
    data = {"panels": [{"title": "gap = bias(target) − bias(control)", "ylabel": "nats", "series": per_model,
                        "categories": union(s["category"] for s in per_model.values())}]}
    plot = Plot("plot-planted-gap", "Log-odds of trait vs counter-trait for the target group minus the control "
                "group, per planted trait; training on planted pairs should raise it.", used, data,
                plots.bars("plot-planted-gap", data))
    return Section("planted", title, parts=[plot, concat_tables("Per trait", tables, collapsed=True)])


AUDIT_SECTIONS = (comparison, metrics, planted, guise, covert_overt, stereo_pairs, agreement, toxicity, privacy)
