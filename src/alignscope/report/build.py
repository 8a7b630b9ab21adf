"""Build the report of a run: one self-contained HTML file and ``report.json`` beside it.

``build_report(run)`` reads the run's artefacts (through ``study.json``, or the manifest of a plain
audit run), assembles sections, renders them with Jinja2 (autoescape on) and writes both files
atomically. The HTML needs no network and runs no script; a Content-Security-Policy forbids any.
Rebuilding from the same artefacts gives byte-identical files (no timestamps of its own).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jinja2

from alignscope.report.audit_sections import AUDIT_SECTIONS
from alignscope.report.model import Section, plain
from alignscope.report.sources import RunSources, open_run
from alignscope.report.study_sections import ATTRIBUTION_SECTIONS, STUDY_SECTIONS
from alignscope.store import atomic_write_json, atomic_write_text

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SCHEMA_VERSION = 1
#: No script, no network: only inline styles and inline SVG. Hostile text that slipped past
#: escaping still could not run.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


class ReportPaths(NamedTuple):
    """Where the report went; a tuple too, so ``html, data = build_report(run)`` works."""

    html: Path
    json: Path


def build_report(run: Path | str, out: Path | str | None = None) -> ReportPaths:
    """Write ``report.html`` and ``report.json`` for a run (into ``out``, default the run itself)."""
    sources = open_run(run)
    sections = collect(sources)
    document = _document(sources, sections)
    target = Path(out) if out is not None else Path(run)
    paths = ReportPaths(target / REPORT_HTML, target / REPORT_JSON)
    atomic_write_json(paths.json, document)
    atomic_write_text(paths.html, render(document, sections))
    return paths


def collect(sources: RunSources) -> list[Section]:
    """Every section in page order; a stage that did not run gives a section that says so."""
    return [build(sources) for build in (*STUDY_SECTIONS, *AUDIT_SECTIONS, *ATTRIBUTION_SECTIONS)]


def _document(sources: RunSources, sections: list[Section]) -> dict[str, Any]:
    from alignscope import __version__

    study = sources.study or {}
    config = study.get("config") if isinstance(study.get("config"), dict) else {}
    return plain({
        "schema_version": SCHEMA_VERSION, "kind": "study" if sources.is_study else "audit",
        "run": sources.root.resolve().name, "title": str(config.get("name") or sources.root.resolve().name),
        "models": list(sources.audits), "generated_by": {"alignscope": __version__},
        "sections": [s.to_json() for s in sections],
    })


def render(document: dict[str, Any], sections: list[Section]) -> str:
    """The HTML page. Autoescape is on for everything; only checked plot SVG is marked safe."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, loader=jinja2.FunctionLoader(_template))
    env.filters["fmt"] = format_value
    env.filters["isnum"] = is_number
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)
    return env.get_template("report.html.j2").render(doc=document, sections=sections, csp=CSP)


def _template(name: str) -> str:
    return resources.files("alignscope.report").joinpath("templates", name).read_text(encoding="utf-8")


def is_number(value: Any) -> bool:
    """A finite number (shown right-aligned); NaN and None are shown as '–' in a text cell."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(value: Any, kind: str = "text") -> str:
    """How a stored value is printed: 3 significant digits (p-values 2), '–' for missing.

    Numbers from 1,000 to under a million keep their integer part (a study's 1270 seconds reads
    as 1270, not 1.27e+03); scientific notation is kept for the very large and very small.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if kind != "p" and 1e3 <= abs(float(f"{value:.3g}")) < 1e6:  # 999.7 rounds to 1000 here
            return f"{value:.0f}"
        return f"{value:.2g}" if kind == "p" else f"{value:.3g}"
    return str(value)
