"""What a report is made of: sections holding tables, plots and text, each tied to its source file.

The HTML template and ``report.json`` are two views of the same objects. The template may only
show what these objects hold, and ``report.json`` serialises all of it (minus the SVG markup), so
every number on the page can be looked up in ``report.json`` together with the file it came from.
Nothing here computes a statistic: values are copied from stored artefacts as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

#: ``text`` short text or a number (numbers are right-aligned and formatted to 3 significant
#: digits), ``longtext`` wrapped prose (pair texts, model outputs), ``p`` a p-value, ``verdict``
#: better/worse/unchanged (coloured), ``code`` monospace (hashes, paths).
ColumnKind = Literal["text", "longtext", "p", "verdict", "code"]


@dataclass(frozen=True)
class Column:
    """A table column; ``kind`` decides formatting and styling (``verdict`` cells are coloured)."""

    name: str
    kind: ColumnKind = "text"


@dataclass
class Table:
    """Rows copied from stored tables or JSON files (``sources`` are relative to the run)."""

    caption: str
    columns: list[Column]
    rows: list[list[Any]]
    sources: list[str]
    collapsed: bool = False  # long value listings behind a plot start folded
    type: str = field(default="table", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "caption": self.caption, "sources": self.sources,
                "columns": [c.name for c in self.columns], "rows": [[plain(v) for v in r] for r in self.rows]}


@dataclass
class Plot:
    """An inline SVG figure plus the exact values it draws (those go to ``report.json``)."""

    id: str
    caption: str
    sources: list[str]
    data: dict[str, Any]
    svg: str = ""
    type: str = field(default="plot", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "caption": self.caption, "sources": self.sources,
                "data": plain(self.data)}


@dataclass
class Text:
    """Preformatted text (configs, notes) shown verbatim and escaped."""

    caption: str
    text: str
    sources: list[str]
    type: str = field(default="text", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "caption": self.caption, "sources": self.sources, "text": self.text}


@dataclass
class Notes:
    """Short remarks (e.g. a probe's notes on how it differs from the paper), one per line."""

    caption: str
    items: list[str]
    sources: list[str]
    type: str = field(default="notes", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "caption": self.caption, "sources": self.sources, "items": list(self.items)}


Part = Union[Table, Plot, Text, Notes]


@dataclass
class Section:
    """One heading of the report. ``absent`` says plainly why there is nothing to show."""

    id: str
    title: str
    intro: str = ""
    parts: list[Part] = field(default_factory=list)
    absent: str | None = None

    @property
    def sources(self) -> list[str]:
        out: list[str] = []
        for part in self.parts:
            out.extend(part.sources)
        return list(dict.fromkeys(out))

    @property
    def plots(self) -> list[Plot]:
        return [p for p in self.parts if isinstance(p, Plot)]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "intro": self.intro,
                "status": "absent" if self.absent else "shown", "absent": self.absent,
                "sources": self.sources, "parts": [p.to_json() for p in self.parts]}


def absent(id: str, title: str, reason: str, intro: str = "") -> Section:
    """A section that states why it is empty instead of drawing an empty plot."""
    return Section(id=id, title=title, intro=intro, absent=reason)


def plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
