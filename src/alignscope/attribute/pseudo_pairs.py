"""Pseudo-pair measurements for generation probes: what alignment changed in the model's own outputs.

A generation probe's metric (toxicity of sampled replies, say) is read from text, so it has no
gradient. "More RLHF, More Trust?" attributes such a change through pseudo-preference pairs built
from the model's outputs before and after alignment on the same prompt. Here each prompt that both
audits answered gives one pair, oriented by the probe's own per-item score (higher = worse):

    f = Σ_items [log p(worse output | prompt) − log p(better output | prompt)]

so f is higher when the model prefers the worse of its two outputs, which keeps attribution's sign
convention (positive score = up-weighting the training pair moves the metric towards worse). Items
whose two outputs score the same, or are the same text, carry no direction and are left out.

A probe takes part by declaring ``generation_output = (text column, score column, higher is worse)``
of its items table and ``output_request(row, text)``, the generated text as a score request in the
context it was generated for. Items without an output or a score on either side are left out.
The probe is rebuilt with the options the audits stored, so the contexts match what was
generated; the two audits must have run it with the same options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from alignscope.errors import InputError


def pseudo_pair_terms(probe: Any, before: pd.DataFrame, after: pd.DataFrame) -> list[tuple[Any, float]]:
    """(request, weight) terms: +1 on the worse of each item's two outputs, −1 on the better one."""
    text, score, higher_is_worse = probe.generation_output
    for name, items in (("before", before), ("after", after)):
        missing = [c for c in ("item_id", text, score) if c not in items]
        if missing:
            raise InputError(f"{probe.name} audit ({name}): items lack column(s) {', '.join(missing)}; "
                             f"audit both models with the same alignscope version")
    merged = after.merge(before[["item_id", text, score]], on="item_id", suffixes=("", "_before"))
    if merged.empty:
        raise InputError(f"{probe.name}: the two audits share no item; audit both models with the same "
                         "probe options and --limit")
    terms: list[tuple[Any, float]] = []
    for _, row in merged.iterrows():
        now, then = float(row[score]), float(row[f"{score}_before"])
        outputs = (row[text], row[f"{text}_before"])
        if not all(isinstance(o, str) and o for o in outputs) or now != now or then != then:  # NaN: not scored
            continue
        if now == then or outputs[0] == outputs[1]:
            continue
        worse, better = outputs if (now > then) == higher_is_worse else outputs[::-1]
        terms += [(probe.output_request(row, worse), 1.0), (probe.output_request(row, better), -1.0)]
    if not terms:
        raise InputError(f"{probe.name}: every item scored the same before and after; nothing to attribute")
    return terms


def audit_items(audit_dir: str | Path, probe: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A probe's items table from an ``alignscope audit`` run directory, and the options it ran with."""
    from alignscope.audit.runner import audited_probes

    found = audited_probes(Path(audit_dir))
    if probe not in found:
        raise InputError(f"{audit_dir}: has no {probe} audit; run `alignscope audit --probes {probe} --out "
                         f"{audit_dir}` first")
    artefact = found[probe]
    options = json.loads(artefact.file("inputs.json").read_text())["probe"]["options"]
    return pd.read_parquet(artefact.file("items.parquet")), options


def pseudo_pair_measurement(probe_name: str, before_dir: str | Path, after_dir: str | Path
                            ) -> tuple[Any, list[Any], list[float], pd.DataFrame]:
    """(probe, requests, weights, after items) for a generation probe audited before and after alignment."""
    from alignscope.audit.runner import available_probes

    known = available_probes()
    if probe_name not in known or not hasattr(known[probe_name], "generation_output"):
        usable = sorted(n for n, cls in known.items() if hasattr(cls, "generation_output"))
        raise InputError(f"--probe {probe_name}: --before/--after build pseudo-pairs from generated outputs; "
                         f"probes with them: {', '.join(usable)}")
    before, options_before = audit_items(before_dir, probe_name)
    after, options_after = audit_items(after_dir, probe_name)
    if options_before != options_after:
        raise InputError(f"{probe_name}: the audits in {before_dir} and {after_dir} ran with different options; "
                         "audit both models with the same options")
    probe = known[probe_name](**options_after)
    terms = pseudo_pair_terms(probe, before, after)
    return probe, [t[0] for t in terms], [t[1] for t in terms], after
