"""Small builders shared by the section modules: tables from frames and dicts, guarded sections."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd

from alignscope.report.model import Column, ColumnKind, Section, Table, absent
from alignscope.report.sources import MissingArtefact, RunSources

SectionBuilder = Callable[[RunSources], Section]


def guarded(id: str, title: str) -> Callable[[SectionBuilder], SectionBuilder]:
    """A section whose artefact is missing or damaged says so, instead of failing the whole report.

    Unexpected content (a column an older artefact lacks, a plot refused as unsafe) also becomes a
    plain statement in that section: one odd file should not cost the user the rest of the report.
    """

    def wrap(build: SectionBuilder) -> SectionBuilder:
        @functools.wraps(build)
        def run(sources: RunSources) -> Section:
            try:
                return build(sources)
            except MissingArtefact as exc:
                return absent(id, title, f"Not shown: {exc}.")
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                return absent(id, title, f"Not shown: the stored artefacts could not be read for this section "
                                         f"({type(exc).__name__}: {exc}).")
        return run

    return wrap


def not_run(sources: RunSources, id: str, title: str, what: str, consequence: str = "") -> Section:
    """The section of a study step that did not run: an audit run has none, a study may skip it."""
    reason = "this is a single audit run" if not sources.is_study else f"the study {what}"
    return absent(id, title, f"Not run: {reason}{consequence}.")


def frame_table(caption: str, frame: pd.DataFrame, columns: Sequence[str | tuple[str, ColumnKind]],
                sources: Iterable[str], *, prefix: Sequence[tuple[str, Any]] = ()) -> Table:
    """Copy the named columns of a stored table (absent columns are skipped, not invented).

    ``prefix`` adds constant leading columns (e.g. the model a row belongs to).
    """
    specs = [(c, "text") if isinstance(c, str) else c for c in columns]
    specs = [(name, kind) for name, kind in specs if name in frame.columns]
    cols = [Column(name) for name, _ in prefix] + [Column(name, kind) for name, kind in specs]
    rows = [[value for _, value in prefix] + [rec[name] for name, _ in specs]
            for rec in frame.to_dict(orient="records")]
    return Table(caption, cols, rows, list(sources))


def concat_tables(caption: str, tables: Sequence[Table], *, collapsed: bool = False) -> Table:
    """Stack tables with the same columns (one per model) into one."""
    columns = tables[0].columns
    rows = [row for t in tables for row in t.rows]
    sources = list(dict.fromkeys(s for t in tables for s in t.sources))
    return Table(caption, columns, rows, sources, collapsed=collapsed)


def kv_table(caption: str, mapping: dict[str, Any], sources: Iterable[str], *, key: str = "field") -> Table:
    """A two-column table of scalars; nested objects are flattened with dotted keys."""
    rows = [[k, v] for k, v in flatten(mapping)]
    return Table(caption, [Column(key, "code"), Column("value")], rows, list(sources))


def flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in mapping.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(flatten(v, name + "."))
        elif isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
            out.append((name, ", ".join(str(x) for x in v)))
        elif isinstance(v, list):
            out.append((name, f"{len(v)} entries (see the source file)"))
        else:
            out.append((name, v))
    return out


def series(frame: pd.DataFrame, category: str, value: str, **extra: str) -> dict[str, list[Any]]:
    """Columns of a stored per-category table as lists, ready for a plot and for ``report.json``."""
    out = {"category": [str(c) for c in frame[category]], "value": frame[value].tolist()}
    for key, column in extra.items():
        if column in frame:
            out[key] = frame[column].tolist()
    return out


def series_table(caption: str, panel_series: dict[str, dict[str, list[Any]]], sources: Iterable[str],
                 *, category: str, value: str, ci: bool = False) -> Table:
    """The values a bar chart draws, as a table (one row per model and category)."""
    columns = [Column("model"), Column(category), Column(value)]
    if ci:
        columns += [Column("ci_low"), Column("ci_high")]
    rows = []
    for model, s in panel_series.items():
        for i, cat in enumerate(s["category"]):
            row = [model, cat, s["value"][i]]
            if ci:
                row += [s.get("ci_low", [None] * len(s["category"]))[i], s.get("ci_high", [None] * len(s["category"]))[i]]
            rows.append(row)
    return Table(caption, columns, rows, list(sources), collapsed=True)


def union(lists: Iterable[Sequence[str]]) -> list[str]:
    """Categories in first-seen order across models (a bias type one model lacks still gets a slot)."""
    return list(dict.fromkeys(c for seq in lists for c in seq))
