"""Run probes on one model into a run directory; compare audited runs item by item.

One artefact per probe: ``RUN/audit_<probe>/<key>/`` with ``items.parquet`` (per-item scores,
what comparisons pair on), ``summary.json`` (metric values with their metadata, notes, info) and
``tables/*.parquet`` (what the report plots). The key hashes the model fingerprint, the probe's
options, the data and the limit, so re-auditing the same model is free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from alignscope.audit.base import PROBES, Metric, Probe, ProbeResult
from alignscope.audit.stats import align_items, compare_paired, holm
from alignscope.errors import InputError
from alignscope.models.engine import Engine, is_main_process
from alignscope.store import (Artefact, RunDir, atomic_write_json, atomic_write_parquet, file_hash,
                              versions)

AUDIT_PREFIX = "audit_"


def available_probes() -> dict[str, type[Probe]]:
    import alignscope.audit.probes  # noqa: F401  (registers every probe)

    return dict(sorted(PROBES.items()))


def parse_probe_names(spec: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    known = available_probes()
    if not names:
        raise InputError("--probes is empty; name at least one probe (see `alignscope probes list`)")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--probes: unknown probe(s) {', '.join(unknown)}; available: {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_data_overrides(values: Sequence[str], probes: Sequence[str]) -> dict[str, Path]:
    """``--data probe=PATH`` pairs, checked before any model is loaded."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--data {value!r}: expected PROBE=PATH, e.g. --data truthfulness=truth_mc.json")
        if name not in probes:
            raise InputError(f"--data {value!r}: probe {name!r} is not in --probes ({', '.join(probes)})")
        if not Path(path).exists():
            raise InputError(f"--data {value!r}: {path} does not exist")
        out[name] = Path(path)
    return out


def parse_option_overrides(values: Sequence[str], probes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--option PROBE.KEY=VALUE`` settings, per probe, checked before any model is loaded.

    VALUE is read as JSON when it parses (numbers, lists, ``{"format": ...}`` objects) and as text
    otherwise, so ``--option planted_bias.target_group=lawyers`` needs no quotes.
    """
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        target, sep, raw = value.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name or not key:
            raise InputError(f"--option {value!r}: expected PROBE.KEY=VALUE, e.g. --option "
                             "planted_bias.target_group=lawyers")
        if name not in probes:
            raise InputError(f"--option {value!r}: probe {name!r} is not one this command runs ({', '.join(probes)})")
        try:
            out.setdefault(name, {})[key] = json.loads(raw)
        except json.JSONDecodeError:
            out.setdefault(name, {})[key] = raw
    return out


def audit(engine: Engine, probes: Sequence[str], out: Path, *, limit: int | None = None,
          data: dict[str, Path] | None = None, options: dict[str, dict[str, Any]] | None = None,
          seed: int = 0) -> dict[str, Artefact]:
    """Run each probe (skipping ones already finished for this model/config) and store results."""
    registry = available_probes()
    data = data or {}
    options = options or {}
    run = RunDir(out)
    done: dict[str, Artefact] = {}
    for name in tqdm(probes, desc="audit", unit="probe", disable=not engine.progress):
        probe = registry[name](**options.get(name, {}))
        if probe.requires_data and name not in data:
            raise InputError(f"probe {name} has no embedded data; pass --data {name}=PATH ({probe.data_formats})")
        inputs = {
            "stage": "audit", "probe": probe.config(), "model": engine.lm.fingerprint,
            "model_spec": engine.lm.spec, "adapter": engine.lm.adapter, "limit": limit, "seed": seed,
            "data": file_hash(data[name]) if name in data and data[name].is_file() else str(data.get(name, "embedded")),
        }
        stage = AUDIT_PREFIX + name
        found = run.find(stage, inputs)
        if found is None:
            found = _run_probe(engine, probe, run, stage, inputs, data.get(name), limit, seed)
        if found is not None:
            done[name] = found
    return done


def _run_probe(engine: Engine, probe: Probe, run: RunDir, stage: str, inputs: dict[str, Any],
               data: Path | None, limit: int | None, seed: int) -> Artefact | None:
    started = time.perf_counter()
    items = probe.load_items(data, limit=limit, seed=seed)
    result = probe.run(engine, items)
    metrics = summarise(probe, result)
    if not is_main_process():
        return None
    with run.build(stage, inputs) as scratch:
        atomic_write_parquet(scratch / "items.parquet", result.items)
        for table, frame in result.tables.items():
            atomic_write_parquet(scratch / "tables" / f"{table}.parquet", frame)
        atomic_write_json(scratch / "summary.json", {
            "probe": probe.name, "description": probe.description, "metrics": metrics,
            "notes": result.notes, "info": result.info, "n_items": len(result.items),
            "model": {"spec": engine.lm.spec, "adapter": engine.lm.adapter, "fingerprint": engine.lm.fingerprint,
                      "dtype": str(engine.lm.dtype)},
            "seconds": round(time.perf_counter() - started, 2), "options": probe.options,
            "data": str(data) if data else "embedded", "limit": limit, "seed": seed, "versions": versions(),
        })
    return run.find(stage, inputs)


def summarise(probe: Probe, result: ProbeResult) -> dict[str, dict[str, Any]]:
    """Metric values with their metadata; refuses tables that could not be compared later."""
    items = result.items
    if "item_id" not in items or items["item_id"].duplicated().any():
        raise RuntimeError(f"probe {probe.name}: items need a unique item_id column (probe bug)")
    return {m.name: {**m.metadata(), "value": m.compute(items), "n": int(items[m.column].notna().sum())}
            for m in probe.metrics}


# --------------------------------------------------------------------------- compare
def audited_probes(run: Path) -> dict[str, Artefact]:
    """The latest audit artefact of each probe in a run directory."""
    if not Path(run).is_dir():
        raise InputError(f"{run}: not a run directory; pass the --out directory of `alignscope audit`")
    rundir = RunDir(run)
    stages = rundir.manifest().get("artefacts", {})
    found = {s[len(AUDIT_PREFIX):]: rundir.latest(s) for s in stages if s.startswith(AUDIT_PREFIX)}
    found = {k: v for k, v in found.items() if v is not None}
    if not found:
        raise InputError(f"{run}: holds no audit results; run `alignscope audit --out {run}` first")
    return found


def compare(run_a: Path, run_b: Path, *, intersect: bool = False, seed: int = 0,
            n_boot: int = 2000, n_perm: int = 5000) -> pd.DataFrame:
    """Paired comparison of every metric audited in both runs, Holm-corrected across all of them.

    The metrics are those recorded in both runs' ``summary.json`` (with their metadata: column,
    direction, ideal, statistic, binary), so metrics a probe adds per run — TruthfulQA MC1/MC2
    when the MC file was supplied — are compared too, and a metric only one run reported is left out.
    """
    a_probes, b_probes = audited_probes(run_a), audited_probes(run_b)
    common = [p for p in a_probes if p in b_probes]
    if not common:
        raise InputError(f"{run_a} and {run_b} share no audited probe; audit both with the same --probes")
    rows, comparisons = [], []
    for probe in common:
        items_a = pd.read_parquet(a_probes[probe].file("items.parquet"))
        items_b = pd.read_parquet(b_probes[probe].file("items.parquet"))
        metrics = _shared_metrics(probe, a_probes[probe], b_probes[probe], items_a, items_b)
        if not metrics:
            continue
        try:
            idx_a, idx_b = align_items(items_a["item_id"].tolist(), items_b["item_id"].tolist(), intersect)
        except InputError as exc:
            raise InputError(f"probe {probe}: {exc}") from exc
        items_a, items_b = items_a.iloc[idx_a].reset_index(drop=True), items_b.iloc[idx_b].reset_index(drop=True)
        for metric in metrics:
            row, comparison = _compare_metric(probe, metric, items_a, items_b, seed, n_boot, n_perm)
            rows.append(row)
            comparisons.append(comparison)
    if not rows:
        raise InputError(f"{run_a} and {run_b} share no metric; audit both with the same --probes and --data")
    adjusted = holm(comparisons)
    for row, comp in zip(rows, adjusted):
        row["p_holm"] = comp.p_adjusted
        row["significant"] = bool(comp.p_adjusted is not None and comp.p_adjusted < 0.05 and comp.test != "identical")
    return pd.DataFrame(rows)


def _recorded_metrics(probe: str, artefact: Artefact) -> dict[str, dict[str, Any]]:
    """Metric metadata as stored in the run's summary.json (class metrics for summaries without it)."""
    summary = json.loads(artefact.file("summary.json").read_text())
    recorded = summary.get("metrics") or {}
    if recorded and all("column" in m for m in recorded.values()):
        return dict(recorded)
    registry = available_probes()
    if probe not in registry:
        raise InputError(f"probe {probe}: its summary.json has no metric metadata and the probe is not installed; "
                         "re-run the audit with this version of alignscope")
    return {m.name: m.metadata() for m in registry[probe].metrics}


def _shared_metrics(probe: str, artefact_a: Artefact, artefact_b: Artefact, items_a: pd.DataFrame,
                    items_b: pd.DataFrame) -> list[Metric]:
    """Metrics reported by both runs, rebuilt from run A's metadata; definitions must agree."""
    meta_a, meta_b = _recorded_metrics(probe, artefact_a), _recorded_metrics(probe, artefact_b)
    metrics = []
    for name, a in meta_a.items():
        b = meta_b.get(name)
        if b is None:
            continue
        for key in ("column", "statistic", "direction", "ideal", "binary"):
            if a.get(key) != b.get(key):
                raise InputError(f"probe {probe}, metric {name}: the runs define it differently ({key} "
                                 f"{a.get(key)!r} vs {b.get(key)!r}); audit both with the same alignscope version")
        if a["column"] not in items_a or a["column"] not in items_b:
            raise InputError(f"probe {probe}, metric {name}: item column {a['column']!r} is missing from a run's "
                             "items.parquet; the run directory looks damaged")
        low, high = (a.get("range") or [None, None])
        metrics.append(Metric(
            name=name, column=a["column"], description=a.get("description", ""), unit=a.get("unit", ""),
            range=(-np.inf if low is None else float(low), np.inf if high is None else float(high)),
            direction=a["direction"], ideal=float(a["ideal"]), statistic=_statistic(probe, name, a["statistic"]),
            binary=bool(a.get("binary", False))))
    return metrics


def _statistic(probe: str, metric: str, name: str) -> Any:
    """The statistic function a summary names, found among the installed probes' metric
    definitions (class metrics, and metrics defined on the class or its module that instances add)."""
    import sys

    from alignscope.audit import base

    known: dict[str, Any] = {"mean": base.mean, "percent": base.percent}
    for cls in available_probes().values():
        module = sys.modules.get(cls.__module__)
        for value in [*vars(cls).values(), *(vars(module).values() if module else ())]:
            for m in value if isinstance(value, tuple | list) else (value,):
                if isinstance(m, Metric):
                    known.setdefault(m.statistic.__name__, m.statistic)
    if name not in known:
        raise InputError(f"probe {probe}, metric {metric}: statistic {name!r} is not defined by any installed probe; "
                         "compare with the alignscope version that audited the runs")
    return known[name]


def _compare_metric(probe: str, metric: Metric, items_a: pd.DataFrame, items_b: pd.DataFrame,
                    seed: int, n_boot: int, n_perm: int) -> tuple[dict[str, Any], Any]:
    both = items_a[metric.column].notna().to_numpy() & items_b[metric.column].notna().to_numpy()
    a = items_a.loc[both, metric.column].to_numpy(dtype=float)
    b = items_b.loc[both, metric.column].to_numpy(dtype=float)
    if a.size == 0:
        raise InputError(f"probe {probe}, metric {metric.name}: no item has a value in both runs")
    comparison = compare_paired(a, b, metric=f"{probe}/{metric.name}", statistic=metric.statistic,
                                binary=metric.binary or None, n_boot=n_boot, n_perm=n_perm, seed=seed)
    row = {
        "probe": probe, "metric": metric.name, "unit": metric.unit, "direction": metric.direction,
        "ideal": metric.ideal, "n": comparison.n, "value_a": comparison.value_a, "value_b": comparison.value_b,
        "delta": comparison.delta, "ci_low": comparison.ci_low, "ci_high": comparison.ci_high,
        "p_value": comparison.p_value, "test": comparison.test, "effect_size": comparison.effect_size,
        "effect_size_kind": comparison.effect_size_kind,
        "verdict": metric.verdict(comparison.value_a, comparison.value_b),
        "distance_to_ideal_a": float(np.abs(comparison.value_a - metric.ideal)),
        "distance_to_ideal_b": float(np.abs(comparison.value_b - metric.ideal)),
    }
    return row, comparison


def write_comparison(table: pd.DataFrame, out: Path, runs: Sequence[Path]) -> Path:
    """Store a comparison table (Parquet + JSON) as an artefact keyed by the compared artefacts."""
    rundir = RunDir(out)
    inputs = {"stage": "compare", "runs": [str(Path(r).resolve()) for r in runs],
              "artefacts": {str(r): {p: a.key for p, a in audited_probes(r).items()} for r in runs}}
    with rundir.build("compare", inputs) as scratch:
        atomic_write_parquet(scratch / "comparison.parquet", table)
        atomic_write_json(scratch / "comparison.json", table.to_dict(orient="records"))
    return rundir.path("compare", inputs)
