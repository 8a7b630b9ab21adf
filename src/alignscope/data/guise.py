"""Matched-guise probing resources (Hofmann et al., Nature 2024) and loaders for user pair files.

Matched-guise probing asks a model about a *speaker* twice: once with a text in African American
English (AAE) and once with a text of the same meaning in Standard American English (SAE). Because
the meaning is held fixed, any difference in what the model predicts about the speaker (traits,
occupations, court decisions) can only come from the dialect. That is why the pairs must be
meaning-matched and why a pair whose two sides are identical is rejected: it measures nothing.

Bundled resources live in the ``alignscope.resources.guise`` package (see its ``SOURCES.md`` for
what is project-authored and what is a published fact with its citation). They are read through
:mod:`importlib.resources` so they work from a wheel, a zip or a source checkout alike.

User files are plain text, the format of the original study's ``data/pairs/*.txt``: one pair per
line, ``AAE<TAB>SAE``, no header. Every problem in a user file is reported as an
:class:`~alignscope.errors.InputError` naming the file, the 1-based line number, what is wrong and
how to fix it, so a user never has to read a traceback to find a stray space or a missing tab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from io import StringIO
from pathlib import Path

import pandas as pd

from alignscope.errors import InputError

RESOURCE_PACKAGE = "alignscope.resources.guise"
"""Package that holds the bundled TSV/JSON resources."""

UNLABELLED = "unlabelled"
"""Feature label given to pairs read from a user file, which carries no feature column."""

PAIRS_HEADER = ("id", "feature", "aae", "sae")
"""Header of the bundled (labelled) pair format; a user file that starts with it is read as such."""

TEMPLATE_KINDS = ("trait", "employability", "criminality")
"""Template groups every caller can rely on; the file may hold more (see SOURCES.md)."""


@dataclass(frozen=True)
class DialectPair:
    """One meaning-matched pair: the same content in AAE and in SAE.

    Frozen so a pair can be hashed, deduplicated and used as a cache key without anyone mutating
    it between the AAE and the SAE request.

    Attributes:
        id: Stable identifier (``hb001`` for bundled pairs, ``line7`` for line 7 of a user file),
            so per-item scores can be paired across models and runs.
        feature: The AAE feature the pair was written to show (e.g. ``habitual_be``), or
            ``"unlabelled"`` for user files.
        aae: The African American English text.
        sae: The Standard American English text with the same meaning.
    """

    id: str
    feature: str
    aae: str
    sae: str


# --------------------------------------------------------------------------- helpers
def _resource_text(name: str) -> str:
    """Read a bundled resource as UTF-8 text."""
    return resources.files(RESOURCE_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def _read_user_text(path: Path, what: str) -> str:
    """Read a user file as UTF-8, turning the usual failures into one-line InputErrors."""
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path to the {what} file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the path to the {what} file itself")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the {what} file as UTF-8"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions"
        ) from None


def _lines(text: str) -> list[str]:
    """Split into lines without keeping line ends; tolerate Windows line ends and a BOM."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return [line.rstrip("\r") for line in text.split("\n")]


def _check_pair_texts(where: str, aae: str, sae: str) -> None:
    """Reject empty sides and identical sides: both make the pair measure nothing."""
    if not aae:
        raise InputError(
            f"{where}: the AAE text (first field) is empty; write the AAE text before the tab"
        )
    if not sae:
        raise InputError(
            f"{where}: the SAE text (second field) is empty; write the SAE text after the tab"
        )
    if aae == sae:
        raise InputError(
            f"{where}: the AAE and SAE texts are identical; a matched pair must differ in dialect, "
            "so fix the translation or remove the line"
        )


def _parse_user_pairs(text: str, source: str) -> list[DialectPair]:
    """Parse the study's ``AAE<TAB>SAE`` format; skip blank lines, check everything else."""
    pairs: list[DialectPair] = []
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        fields = line.split("\t")
        if len(fields) != 2:
            hint = (
                "separate the two texts with a tab"
                if len(fields) == 1
                else "put exactly one tab between the AAE and the SAE text "
                "(a text may not contain a tab)"
            )
            raise InputError(
                f"{where}: expected 2 tab-separated fields (AAE, SAE), got {len(fields)}; {hint}"
            )
        aae, sae = (f.strip() for f in fields)
        _check_pair_texts(where, aae, sae)
        pairs.append(DialectPair(id=f"line{n}", feature=UNLABELLED, aae=aae, sae=sae))
    if not pairs:
        raise InputError(f"{source}: contains no pairs; write one 'AAE<TAB>SAE' pair per line")
    return pairs


def _parse_labelled_pairs(text: str, source: str) -> list[DialectPair]:
    """Parse the bundled ``id<TAB>feature<TAB>aae<TAB>sae`` format (header on line 1)."""
    lines = _lines(text)
    if tuple(lines[0].split("\t")) != PAIRS_HEADER:
        expected = "<TAB>".join(PAIRS_HEADER)
        raise InputError(f"{source} line 1: expected the header {expected}, got {lines[0]!r}")
    pairs: list[DialectPair] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        fields = line.split("\t")
        if len(fields) != 4:
            raise InputError(
                f"{where}: expected 4 tab-separated fields (id, feature, aae, sae), got "
                f"{len(fields)}; separate the fields with single tabs"
            )
        pid, feature, aae, sae = (f.strip() for f in fields)
        if not pid or not feature:
            raise InputError(f"{where}: the id and feature fields must not be empty; fill them in")
        if pid in seen:
            raise InputError(
                f"{where}: id {pid!r} already used on line {seen[pid]}; give each pair its own id"
            )
        seen[pid] = n
        _check_pair_texts(where, aae, sae)
        pairs.append(DialectPair(id=pid, feature=feature, aae=aae, sae=sae))
    if not pairs:
        raise InputError(f"{source}: contains a header but no pairs")
    return pairs


def _read_tsv(name: str, dtypes: dict[str, str]) -> pd.DataFrame:
    """Read a bundled TSV with empty cells as missing values and nothing else treated as NA.

    ``keep_default_na=False`` matters: pandas would otherwise turn words such as ``"null"`` or
    ``"NA"`` into NaN. Only an empty cell means "no published value" in these files.
    """
    frame = pd.read_csv(
        StringIO(_resource_text(name)),
        sep="\t",
        dtype=str,
        keep_default_na=False,
        na_values=[""],
    )
    for column, dtype in dtypes.items():
        if dtype == "str":
            continue
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype(dtype)
    return frame


# --------------------------------------------------------------------------- public API
def load_dialect_pairs(path: Path | None = None) -> list[DialectPair]:
    """Load meaning-matched AAE/SAE pairs.

    Args:
        path: ``None`` for the bundled, feature-labelled pairs written for this project. Otherwise a
            user file in the study's format: one pair per line, ``AAE<TAB>SAE``, no header (the
            format of Hofmann et al.'s ``data/pairs/*.txt``). Such pairs get the feature
            ``"unlabelled"`` and the id ``line{n}`` after their 1-based line number, so a result can
            be traced back to the line that produced it. A user file that starts with the bundled
            header ``id<TAB>feature<TAB>aae<TAB>sae`` is read in that labelled format instead.

    Returns:
        The pairs in file order.

    Raises:
        InputError: the file is missing or unreadable, has no pairs, or a line has the wrong number
            of fields, an empty text, or identical AAE and SAE texts. The message names the file and
            line and says how to fix it.
    """
    if path is None:
        return _parse_labelled_pairs(_resource_text("dialect_pairs.tsv"), "dialect_pairs.tsv")
    path = Path(path)
    text = _read_user_text(path, "pairs")
    first = _lines(text)[0] if text else ""
    if tuple(first.split("\t")) == PAIRS_HEADER:
        return _parse_labelled_pairs(text, str(path))
    return _parse_user_pairs(text, str(path))


def load_adjectives() -> pd.DataFrame:
    """The 84 Katz-Braly trait adjectives with favourability and human stereotype data.

    Columns: ``adjective``; ``favourability`` (Bergsieker et al. 2012 rating, roughly -2..2, as
    used by Hofmann et al.); ``in_1933``, ``in_1951``, ``in_1969``, ``in_2012`` (1 if the
    adjective is among Hofmann et al.'s top-5 human stereotypes about African Americans for that
    study); ``probed`` (1 if Hofmann et al. probed it: their 37 single-token adjectives);
    ``pct_1933`` .. ``pct_2012`` (the published percentage of participants who chose it; missing
    where that study did not report the adjective). See ``SOURCES.md`` for the exact rules and
    sources. Nullable integer columns are used so a value that was never published stays missing
    instead of silently becoming 0.
    """
    return _read_tsv(
        "katz_adjectives.tsv",
        {
            "adjective": "str",
            "favourability": "float64",
            "in_1933": "Int64",
            "in_1951": "Int64",
            "in_1969": "Int64",
            "in_2012": "Int64",
            "probed": "Int64",
            "pct_1933": "float64",
            "pct_1951": "float64",
            "pct_1969": "float64",
            "pct_2012": "float64",
        },
    )


def load_templates() -> dict[str, list[str]]:
    """Prompt templates of Hofmann et al.; ``{}`` is where the text (or group word) goes.

    Keys: ``trait`` (9), ``employability`` (18: the "a" and the "an" form of 9 prompts; pair each
    occupation only with the form whose article fits it), ``criminality`` (``conviction`` then
    ``sentence``), ``conviction`` (3, answered by acquitted/convicted), ``sentence`` (3, answered
    by life/death), ``overt_trait`` (9 overt-prejudice templates where ``{}`` is a group word
    such as "Black", not a text). Templates are kept exactly as published, including the spaces
    inside the quotes, because results are only comparable with the study's when the prompt is
    identical.

    Returns a fresh dict each call so callers may modify it freely.
    """
    data = json.loads(_resource_text("templates.json"))
    missing = [kind for kind in TEMPLATE_KINDS if kind not in data]
    if missing:
        raise InputError(f"templates.json: missing template groups {missing}")
    templates: dict[str, list[str]] = {}
    for kind, items in data.items():
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise InputError(f"templates.json: {kind!r} must be a list of strings")
        for template in items:
            if template.count("{}") != 1:
                raise InputError(
                    f"templates.json: {kind!r} template {template!r} "
                    "must contain exactly one '{}'"
                )
        templates[kind] = list(items)
    return templates


def load_occupations() -> pd.DataFrame:
    """The 84 occupations of Hofmann et al.'s employability analysis with their prestige.

    Columns: ``occupation``; ``prestige`` (General Social Survey occupational prestige, 1-9 scale,
    mapped to the one-word occupation exactly as Hofmann et al. did; missing for the 19
    occupations their mapping found no GSS title for). See ``SOURCES.md``.
    """
    return _read_tsv("occupations.tsv", {"occupation": "str", "prestige": "float64"})


def load_attribute_list(path: Path) -> list[str]:
    """Read a user attribute list: one attribute (a word such as ``lazy``) per line.

    This is the format of the study's ``data/attributes/*.txt``. Blank lines and surrounding
    whitespace are ignored. Each attribute must be a single word (hyphens are fine) because
    matched-guise probing scores it as the model's next word; a duplicate would count one
    attribute twice, so both are errors that name the file and line.

    Raises:
        InputError: the file is missing, unreadable, empty, or a line holds more than one word or
            repeats an earlier attribute.
    """
    path = Path(path)
    text = _read_user_text(path, "attribute list")
    attributes: list[str] = []
    first_seen: dict[str, int] = {}
    for n, line in enumerate(_lines(text), start=1):
        word = line.strip()
        if not word:
            continue
        if len(word.split()) != 1:
            raise InputError(
                f"{path} line {n}: expected one attribute per line, got {word!r}; "
                "put each attribute on its own line"
            )
        if word in first_seen:
            raise InputError(
                f"{path} line {n}: {word!r} already appears on line {first_seen[word]}; "
                "remove the duplicate"
            )
        first_seen[word] = n
        attributes.append(word)
    if not attributes:
        raise InputError(f"{path}: contains no attributes; write one attribute per line")
    return attributes
