"""Loaders for alignscope's embedded, project-authored datasets (and their official formats).

Why embedded data exists: an audit has to run offline, on a fresh install, with no dataset
downloads and no licence questions. So alignscope ships small datasets written for this project
(see ``alignscope/resources/README.md``) that follow the *designs* of published benchmarks:

* ``ethics_scenarios.csv`` -- commonsense-morality scenarios in the ETHICS ``cm`` column format;
* ``everyday_prompts.txt`` -- ordinary chat requests, used to synthesise preference pairs;
* ``benign_requests.txt`` -- harmless requests that *look* risky, to measure over-refusal;
* ``refusal_markers.txt`` -- lowercase phrases that signal a refusal;
* ``stereotype_agreement.json`` -- the DecodingTrust stereotype-agreement design
  (16 topics x 3 statements x 24 groups) with project-authored statements.

Why the loaders also accept the official files: a user who has the real benchmark (ETHICS
``cm_test.csv``, DecodingTrust ``user_prompts.csv``) should get numbers comparable with the
literature, through the same code path and the same DataFrame shape as the embedded data.
Those files are user input, so every problem is reported as one :class:`InputError` line
that names the file, the line, and the fix -- never a pandas traceback.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from alignscope.errors import InputError

__all__ = [
    "ETHICS_COLUMNS",
    "STATEMENT_COLUMNS",
    "StereotypeDesign",
    "load_benign_requests",
    "load_ethics",
    "load_everyday_prompts",
    "load_refusal_markers",
    "load_stereotype_agreement",
]

_RESOURCES = "alignscope.resources"

#: Column order of the ETHICS commonsense-morality (``cm``) CSV files.
ETHICS_COLUMNS: tuple[str, ...] = ("label", "input", "is_short", "edited")

#: Columns of :attr:`StereotypeDesign.statements`.
STATEMENT_COLUMNS: tuple[str, ...] = (
    "topic",
    "statement_idx",
    "group",
    "stereotyped_group",
    "statement",
    "user_prompt",
)

#: Columns of DecodingTrust's ``stereotype/user_prompts.csv``.
_DT_USER_COLUMNS: tuple[str, ...] = (
    "stereotype_topic",
    "target_group",
    "stereotype_template",
    "user_prompt",
)
_DT_SLOT = "[target_group]"
_GROUP_SLOT = "{group}"
_STATEMENT_SLOT = "{statement}"
_SYSTEM_KINDS: tuple[str, ...] = ("benign", "untargeted", "targeted")

_TRUE = {"1", "true", "t", "yes"}
_FALSE = {"0", "false", "f", "no"}


# --------------------------------------------------------------------------- helpers


def _read_resource(name: str) -> str:
    """Read an embedded resource as text.

    ``importlib.resources`` (not ``__file__`` paths) so it works from wheels, zip imports
    and editable installs alike.
    """
    return resources.files(_RESOURCES).joinpath(name).read_text(encoding="utf-8")


def _read_user_file(path: Path, what: str) -> str:
    """Read a user-supplied text file, turning OS and encoding errors into InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; pass the path to an existing {what}.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass the path to the {what} file itself.")
    try:
        # utf-8-sig: files saved by spreadsheet programs often start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not valid UTF-8 (byte {exc.start}); re-save the {what} as UTF-8."
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions.") from None


def _csv_records(text: str, source: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Parse CSV text into a header and ``(line_number, fields)`` records.

    The csv module is used instead of ``pandas.read_csv`` because quoted ETHICS scenarios
    may span several physical lines; tracking the line where each record *starts* is what
    lets an error message point the user at the right place in their editor.
    """
    # strict=True: a stray quote inside an unquoted field is an error, not silently kept.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                pass  # blank line
            elif header is None:
                header = [h.strip() for h in row]
            else:
                records.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(
            f"{source}: line {start}: malformed CSV ({exc}); check the quotes in the record starting there."
        ) from None
    if not header or not any(header):
        raise InputError(f"{source}: line 1: file is empty; it needs a header row and data rows.")
    return header, records


def _require_columns(header: list[str], required: tuple[str, ...], source: str) -> dict[str, int]:
    """Map required column names to their positions, or say which are missing."""
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{source}: line 1: missing column(s) {', '.join(missing)} (found: {', '.join(header)}); "
            f"the header must be: {','.join(required)}."
        )
    return {c: header.index(c) for c in required}


def _field(row: list[str], idx: int, header_len: int, line: int, source: str) -> str:
    if len(row) != header_len:
        raise InputError(
            f"{source}: line {line}: expected {header_len} fields, found {len(row)}; "
            "quote any value that contains a comma."
        )
    return row[idx]


def _parse_bool(value: str, column: str, line: int, source: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InputError(
        f"{source}: line {line}: {column} must be True/False or 1/0, got {value!r}; fix that value."
    )


def _text_lines(name: str) -> list[str]:
    """Non-blank, stripped lines of an embedded text resource, in file order."""
    return [line.strip() for line in _read_resource(name).splitlines() if line.strip()]


# --------------------------------------------------------------------------- ETHICS


def _parse_ethics(text: str, source: str) -> pd.DataFrame:
    header, records = _csv_records(text, source)
    cols = _require_columns(header, ETHICS_COLUMNS, source)
    labels: list[int] = []
    inputs: list[str] = []
    short: list[bool] = []
    edited: list[bool] = []
    for line, row in records:
        label = _field(row, cols["label"], len(header), line, source).strip()
        if label not in ("0", "1"):
            raise InputError(
                f"{source}: line {line}: label must be 0 (not wrong) or 1 (wrong), got {label!r}; "
                "fix the label on that line."
            )
        scenario = row[cols["input"]].strip()
        if not scenario:
            raise InputError(f"{source}: line {line}: input is empty; write the scenario text or drop the row.")
        labels.append(int(label))
        inputs.append(scenario)
        short.append(_parse_bool(row[cols["is_short"]], "is_short", line, source))
        edited.append(_parse_bool(row[cols["edited"]], "edited", line, source))
    if not labels:
        raise InputError(f"{source}: no data rows after the header; add scenarios in the form label,input,is_short,edited.")
    return pd.DataFrame(
        {
            "label": pd.Series(labels, dtype="int64"),
            "input": pd.Series(inputs, dtype=object),
            "is_short": pd.Series(short, dtype=bool),
            "edited": pd.Series(edited, dtype=bool),
        }
    )


def load_ethics(path: Path | None = None) -> pd.DataFrame:
    """Commonsense-morality scenarios as ``label, input, is_short, edited``.

    ``label`` is 1 when the first-person action is clearly morally wrong, 0 when it is not
    (the ETHICS ``cm`` convention). Without ``path`` this returns the embedded, exactly
    balanced project set; with ``path`` it reads a file in the official ETHICS ``cm`` format
    (for example ``cm_test.csv``), whose ``is_short``/``edited`` columns may be ``True``/``False``
    or ``1``/``0``. Extra columns are ignored.

    Raises:
        InputError: the file is missing, unreadable, lacks a required column, or has a row
            with a bad label, empty input or wrong field count; the message names the line.
    """
    if path is None:
        return _parse_ethics(_read_resource("ethics_scenarios.csv"), "alignscope/resources/ethics_scenarios.csv")
    path = Path(path)
    return _parse_ethics(_read_user_file(path, "ETHICS commonsense CSV (label,input,is_short,edited)"), str(path))


# --------------------------------------------------------------------------- text lists


def load_everyday_prompts() -> list[str]:
    """Ordinary, harmless chat requests (cooking, writing, code, travel, study, ...).

    Used as the prompt side when synthesising preference pairs, so that alignment runs need
    no downloaded instruction dataset.
    """
    return _text_lines("everyday_prompts.txt")


def load_benign_requests() -> list[str]:
    """Harmless requests that superficially look risky ("How do I kill a stuck process?").

    A model that refuses these is over-refusing; comparing the refusal rate before and after
    alignment shows whether training made the model jumpier, not safer.
    """
    return _text_lines("benign_requests.txt")


def load_refusal_markers() -> list[str]:
    """Lowercase phrases whose presence in a reply signals a refusal ("i can't help with").

    Match them against ``reply.lower()`` after replacing typographic apostrophes (U+2019)
    with ``'``; the markers use the plain ASCII apostrophe.
    """
    return [m.lower() for m in _text_lines("refusal_markers.txt")]


# --------------------------------------------------------------------------- stereotypes


@dataclass(frozen=True, eq=False)
class StereotypeDesign:
    """The stereotype-agreement probe: who, about what, and the exact prompts.

    Attributes:
        groups: ``{"stereotyped": (...), "non_stereotyped": (...)}`` target groups, in order.
        topics: topic keys in order (DecodingTrust's: ``hiv``, ``terrorists``, ...).
        templates: topic -> statement templates, each with exactly one ``{group}`` slot.
        user_template: the agree/disagree instruction with one ``{statement}`` slot, or
            ``None`` when a loaded file does not use one shared instruction.
        system_prompts: ``benign``/``untargeted``/``targeted`` system prompts; ``targeted``
            contains ``{group}``. Empty when a loaded file has no ``system_prompts.csv`` beside it.
        statements: one row per (topic, statement_idx, group) with columns
            :data:`STATEMENT_COLUMNS`; ``user_prompt`` is exactly what is sent to the model.
        source: where the design came from (resource name or file path), for reports.
    """

    groups: Mapping[str, tuple[str, ...]]
    topics: tuple[str, ...]
    templates: Mapping[str, tuple[str, ...]]
    user_template: str | None
    system_prompts: Mapping[str, str]
    statements: pd.DataFrame = field(repr=False)
    source: str = ""

    @property
    def all_groups(self) -> tuple[str, ...]:
        """Stereotyped groups followed by non-stereotyped groups."""
        return tuple(self.groups.get("stereotyped", ())) + tuple(self.groups.get("non_stereotyped", ()))

    def system_prompt(self, kind: str, group: str | None = None) -> str:
        """The system prompt of ``kind`` (benign/untargeted/targeted) rendered for ``group``."""
        if kind not in self.system_prompts:
            raise InputError(
                f"unknown system prompt kind {kind!r}; use one of: {', '.join(self.system_prompts) or '(none loaded)'}."
            )
        text = self.system_prompts[kind]
        if _GROUP_SLOT in text:
            if group is None:
                raise InputError(f"the {kind!r} system prompt needs a target group; pass group=...")
            text = text.replace(_GROUP_SLOT, group)
        return text


def _statements_frame(
    rows: list[tuple[str, int, str, bool, str, str]],
    topics: tuple[str, ...],
    group_order: tuple[str, ...],
) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(STATEMENT_COLUMNS))
    frame["statement_idx"] = frame["statement_idx"].astype("int64")
    frame["stereotyped_group"] = frame["stereotyped_group"].astype(bool)
    # One canonical order for embedded and loaded designs: topic, statement, group.
    frame["_t"] = frame["topic"].map({t: i for i, t in enumerate(topics)})
    frame["_g"] = frame["group"].map({g: i for i, g in enumerate(group_order)})
    frame = frame.sort_values(["_t", "statement_idx", "_g"], kind="stable")
    return frame.drop(columns=["_t", "_g"]).reset_index(drop=True)


def _embedded_design() -> StereotypeDesign:
    source = "alignscope/resources/stereotype_agreement.json"
    raw = json.loads(_read_resource("stereotype_agreement.json"))
    stereo = tuple(raw["groups"]["stereotyped"])
    non = tuple(raw["groups"]["non_stereotyped"])
    topics = tuple(t["topic"] for t in raw["topics"])
    templates = {t["topic"]: tuple(t["statements"]) for t in raw["topics"]}
    user_template: str = raw["user_template"]
    system_prompts = {k: raw["system_prompts"][k] for k in _SYSTEM_KINDS}
    # These checks guard against a broken edit of the embedded file, not user input.
    if set(stereo) & set(non):
        raise InputError(f"{source}: groups {sorted(set(stereo) & set(non))} are in both lists; keep each once.")
    if user_template.count(_STATEMENT_SLOT) != 1:
        raise InputError(f"{source}: user_template must contain {_STATEMENT_SLOT} exactly once.")
    if _GROUP_SLOT not in system_prompts["targeted"]:
        raise InputError(f"{source}: the targeted system prompt must contain {_GROUP_SLOT}.")
    rows: list[tuple[str, int, str, bool, str, str]] = []
    for topic in topics:
        for idx, template in enumerate(templates[topic]):
            if template.count(_GROUP_SLOT) != 1:
                raise InputError(f"{source}: topic {topic!r} statement {idx}: needs exactly one {_GROUP_SLOT}.")
            for group in stereo + non:
                statement = template.replace(_GROUP_SLOT, group)
                prompt = user_template.replace(_STATEMENT_SLOT, statement)
                rows.append((topic, idx, group, group in stereo, statement, prompt))
    return StereotypeDesign(
        groups={"stereotyped": stereo, "non_stereotyped": non},
        topics=topics,
        templates=templates,
        user_template=user_template,
        system_prompts=system_prompts,
        statements=_statements_frame(rows, topics, stereo + non),
        source=source,
    )


def _dt_system_prompts(path: Path) -> dict[str, str]:
    """Read DecodingTrust ``system_prompts.csv`` (``type,system_prompt``), ``[target_group]`` -> ``{group}``."""
    source = str(path)
    header, records = _csv_records(_read_user_file(path, "DecodingTrust system_prompts.csv"), source)
    cols = _require_columns(header, ("type", "system_prompt"), source)
    prompts: dict[str, str] = {}
    for line, row in records:
        kind = _field(row, cols["type"], len(header), line, source).strip()
        prompts[kind] = row[cols["system_prompt"]].replace(_DT_SLOT, _GROUP_SLOT)
    return prompts


def _dt_design(path: Path, known: StereotypeDesign) -> StereotypeDesign:
    if path.is_dir():
        path = path / "user_prompts.csv"
    source = str(path)
    header, records = _csv_records(_read_user_file(path, "DecodingTrust user_prompts.csv"), source)
    cols = _require_columns(header, _DT_USER_COLUMNS, source)
    stereo_known = set(known.groups["stereotyped"])
    non_known = set(known.groups["non_stereotyped"])
    topics: list[str] = []
    templates: dict[str, list[str]] = {}
    groups_seen: list[str] = []
    seen_keys: set[tuple[str, int, str]] = set()
    prefixes: set[str] = set()
    rows: list[tuple[str, int, str, bool, str, str]] = []
    for line, row in records:
        topic = _field(row, cols["stereotype_topic"], len(header), line, source).strip()
        group = row[cols["target_group"]].strip()
        template = row[cols["stereotype_template"]].strip()
        prompt = row[cols["user_prompt"]]
        if not topic or not group:
            raise InputError(f"{source}: line {line}: stereotype_topic and target_group must not be empty.")
        if template.count(_DT_SLOT) != 1:
            raise InputError(
                f"{source}: line {line}: stereotype_template must contain {_DT_SLOT} exactly once, "
                f"got {template!r}; fix the template."
            )
        if group in stereo_known:
            stereotyped = True
        elif group in non_known:
            stereotyped = False
        else:
            raise InputError(
                f"{source}: line {line}: unknown target_group {group!r}; use one of the 24 DecodingTrust "
                f"groups: {', '.join(known.all_groups)}."
            )
        statement = template.replace(_DT_SLOT, group)
        if not prompt.endswith(statement):
            raise InputError(
                f"{source}: line {line}: user_prompt does not end with the statement {statement!r}; "
                "the prompt must be the instruction followed by the rendered template."
            )
        if topic not in templates:
            topics.append(topic)
            templates[topic] = []
        if template not in templates[topic]:
            templates[topic].append(template)
        idx = templates[topic].index(template)
        if (topic, idx, group) in seen_keys:
            raise InputError(f"{source}: line {line}: duplicate row for ({topic}, {template!r}, {group}); remove it.")
        seen_keys.add((topic, idx, group))
        if group not in groups_seen:
            groups_seen.append(group)
        prefixes.add(prompt[: len(prompt) - len(statement)])
        rows.append((topic, idx, group, stereotyped, statement, prompt))
    if not rows:
        raise InputError(f"{source}: no data rows after the header; expected {','.join(_DT_USER_COLUMNS)} rows.")
    stereo = tuple(g for g in known.groups["stereotyped"] if g in groups_seen)
    non = tuple(g for g in known.groups["non_stereotyped"] if g in groups_seen)
    system_path = path.parent / "system_prompts.csv"
    return StereotypeDesign(
        groups={"stereotyped": stereo, "non_stereotyped": non},
        topics=tuple(topics),
        templates={t: tuple(v.replace(_DT_SLOT, _GROUP_SLOT) for v in templates[t]) for t in topics},
        user_template=(next(iter(prefixes)) + _STATEMENT_SLOT) if len(prefixes) == 1 else None,
        system_prompts=_dt_system_prompts(system_path) if system_path.is_file() else {},
        statements=_statements_frame(rows, tuple(topics), stereo + non),
        source=source,
    )


def load_stereotype_agreement(path: Path | None = None) -> StereotypeDesign:
    """The stereotype-agreement probe (DecodingTrust design), embedded or from a file.

    Without ``path``: the embedded project-authored design, 16 topics x 3 statements x 24
    groups = 1152 rendered statements. With ``path``: DecodingTrust's
    ``stereotype/user_prompts.csv`` (or the folder holding it); ``system_prompts.csv`` beside it
    is read too when present. Both give the same :attr:`StereotypeDesign.statements` shape, so
    agreement rates computed on either are directly comparable.

    Raises:
        InputError: a missing/unreadable file, missing columns, an unknown group, or a row
            whose template or prompt is inconsistent; the message names the line.
    """
    embedded = _embedded_design()
    if path is None:
        return embedded
    return _dt_design(Path(path), embedded)
