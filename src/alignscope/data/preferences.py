"""Preference pairs: one record type, loaders for the common formats, validation, export.

Every alignment stage (DPO, IPO, ORPO, KTO, SimPO, ...) and every attribution step reads the same
record, :class:`PreferencePair`: a prompt dialogue that ends with a user turn, and two final
assistant replies, ``chosen`` and ``rejected``. The loaders turn the formats people actually have
into that record, and check it on the way in, because a bad pair found mid-training costs minutes
and a confusing traceback, while a bad pair found at load time costs one line:

``pairs.jsonl: line 17: "chosen" and "rejected" are identical; ... fix or drop that line``.

Formats (``format="auto"`` picks one from the fields of the first record):

``alignscope``
    What :func:`write_preferences` writes: ``id``, ``prompt`` (chat messages), ``chosen``,
    ``rejected``, ``planted``, ``group``, ``meta``. Round-trips exactly.
``trl``
    TRL's preference format: ``prompt``/``chosen``/``rejected``, each a string or a list of
    ``{"role", "content"}`` messages ("standard" or "conversational"). ``chosen``/``rejected`` may
    also be full conversations that repeat the prompt, and the prompt may be left out when they
    are conversations ("implicit prompt": the shared messages before the final reply).
``hh-rlhf``
    Anthropic HH-RLHF: full dialogues in ``chosen``/``rejected`` written as
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The shared turns become the prompt dialogue (several
    turns become several messages); the two final assistant turns become the replies.
``ultrafeedback``
    Binarised UltraFeedback (``prompt``, ``chosen``/``rejected`` message lists, ``score_chosen``/
    ``score_rejected`` kept in ``meta``), or raw UltraFeedback (``instruction`` + ``completions``
    with ``response`` and ``overall_score``): the best-scored completion is chosen, the
    worst-scored rejected.

Files may be ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.csv``
(columns named as above; cells holding message lists are JSON) or ``.parquet``. Anything else
that is not an existing path is treated as a Hugging Face hub dataset id and read with
``datasets.load_dataset`` (which needs network access or a local hub cache).

Over-long examples are *not* rejected here: a 5 MB reply is valid data. The trainer truncates to
its token budget and counts what it truncated.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from alignscope.errors import InputError
from alignscope.store import atomic_write_bytes, atomic_write_parquet, content_hash

__all__ = [
    "FORMATS",
    "ROLES",
    "PreferencePair",
    "frame_from_pairs",
    "load_preferences",
    "pairs_from_frame",
    "pairs_to_frame",
    "preferences_fingerprint",
    "to_trl_rows",
    "write_preferences",
]

#: Accepted values of ``load_preferences(format=...)`` besides ``"auto"``.
FORMATS: tuple[str, ...] = ("alignscope", "trl", "hh-rlhf", "ultrafeedback")
_ALIASES = {"hh": "hh-rlhf", "hh_rlhf": "hh-rlhf", "anthropic": "hh-rlhf", "uf": "ultrafeedback",
            "ultrafeedback-binarized": "ultrafeedback", "ultrafeedback_binarized": "ultrafeedback",
            "own": "alignscope"}
#: Chat roles a message may have.
ROLES: tuple[str, ...] = ("system", "user", "assistant")

_OWN_FIELDS = ("id", "prompt", "chosen", "rejected", "planted", "group", "meta")
_FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class _RowError(Exception):
    """A problem with one record; the reader adds the file and line before it reaches the user."""


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair.

    Attributes:
        id: unique within a dataset; names the pair in attribution rankings.
        prompt: the dialogue before the replies, as ``{"role", "content"}`` messages ending with a
            user turn. A plain string becomes one user message.
        chosen: the preferred final assistant reply (text only, no role markers).
        rejected: the dispreferred final assistant reply.
        planted: ground truth for attribution: this pair was injected by :mod:`planting`.
        group: the social group a planted pair is about (``None`` otherwise).
        meta: JSON-able extras (origin format and line, rewards, scores, planting details).

    Frozen, but it holds dicts, so it is not hashable; use ``id`` as a key.
    """

    id: str
    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    planted: bool = False
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InputError(f"preference pair id must be a non-empty string, got {self.id!r}")
        try:
            prompt = _messages(self.prompt, "prompt")
            _check_prompt(prompt)
            for name in ("chosen", "rejected"):
                _check_reply(getattr(self, name), name)
            if _same(self.chosen, self.rejected):
                raise _RowError('"chosen" and "rejected" are identical; a pair needs two different replies')
        except _RowError as exc:
            raise InputError(f"preference pair {self.id!r}: {exc}") from None
        if self.group is not None and not isinstance(self.group, str):
            raise InputError(f"preference pair {self.id!r}: group must be a string or None")
        if not isinstance(self.meta, dict):
            raise InputError(f"preference pair {self.id!r}: meta must be a dict")
        object.__setattr__(self, "prompt", tuple(prompt))
        object.__setattr__(self, "planted", bool(self.planted))

    @property
    def prompt_text(self) -> str:
        """The content of the final user turn (what a single-turn consumer sends)."""
        return self.prompt[-1]["content"]

    def conversation(self, which: Literal["chosen", "rejected"]) -> list[dict[str, str]]:
        """The prompt messages followed by the chosen or rejected assistant reply."""
        reply = self.chosen if which == "chosen" else self.rejected
        return [dict(m) for m in self.prompt] + [{"role": "assistant", "content": reply}]

    def to_dict(self) -> dict[str, Any]:
        """The export record (``alignscope`` format)."""
        return {"id": self.id, "prompt": [dict(m) for m in self.prompt], "chosen": self.chosen,
                "rejected": self.rejected, "planted": self.planted, "group": self.group,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> PreferencePair:
        return cls(id=record["id"], prompt=record["prompt"], chosen=record["chosen"],
                   rejected=record["rejected"], planted=bool(record.get("planted", False)),
                   group=record.get("group"), meta=dict(record.get("meta") or {}))


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    """A string (one user turn) or a list of messages, validated and reduced to role + content."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise _RowError(f'"{name}" must be a string or a list of chat messages, got {_type(value)}')
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise _RowError(f'"{name}" message {i} must be an object with "role" and "content", got {_type(message)}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(f'"{name}" message {i} has role {role!r}; use one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise _RowError(f'"{name}" message {i} content must be a string, got {_type(content)}')
        out.append({"role": role, "content": content})
    return out


def _check_prompt(prompt: list[dict[str, str]]) -> None:
    if not prompt:
        raise _RowError('"prompt" is empty; it needs at least one user message')
    if prompt[-1]["role"] != "user":
        raise _RowError(f'"prompt" must end with a user turn, but its last message is {prompt[-1]["role"]!r}')
    if not prompt[-1]["content"].strip():
        raise _RowError('"prompt" is empty (its final user turn has no text); write the prompt or drop the row')


def _check_reply(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise _RowError(f'"{name}" must be a string reply, got {_type(value)}')
    if not value.strip():
        raise _RowError(f'"{name}" is empty; write the reply or drop the row')


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- format conversion


def _detect(record: dict[str, Any]) -> str:
    keys = set(record)
    if {"id", "prompt", "chosen", "rejected", "planted", "meta"} <= keys:
        return "alignscope"
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "ultrafeedback" if {"score_chosen", "score_rejected"} & keys else "trl"
    if {"chosen", "rejected"} <= keys:
        return "hh-rlhf" if isinstance(record["chosen"], str) else "trl"
    shown = ", ".join(sorted(keys)[:12]) or "none"
    raise _RowError(
        f"cannot tell the preference format from the fields ({shown}); expected prompt/chosen/rejected "
        "(TRL), chosen/rejected dialogues (HH-RLHF), instruction/completions (UltraFeedback) or "
        "alignscope's export; rename the columns or pass format=..."
    )


def _require(record: dict[str, Any], names: Sequence[str], fmt: str) -> None:
    for name in names:
        if name not in record:
            raise _RowError(f'missing field "{name}" (the {fmt} format needs {", ".join(names)}); add it')
        if record[name] is None:
            raise _RowError(f'field "{name}" is null; give it a value or drop the row')


def _reply(value: Any, prompt: list[dict[str, str]], name: str) -> str:
    """The final assistant reply from a string, or from a message list that may repeat the prompt."""
    if isinstance(value, str):
        return value
    messages = _messages(value, name)
    if len(messages) > 1 and len(messages) > len(prompt) and _turns_equal(messages[:len(prompt)], prompt):
        messages = messages[len(prompt):]
    if len(messages) != 1:
        raise _RowError(f'"{name}" has {len(messages)} messages after the prompt; expected exactly one '
                        "assistant reply (or the prompt followed by one reply)")
    if messages[0]["role"] != "assistant":
        raise _RowError(f'"{name}" reply has role {messages[0]["role"]!r}; the reply must be an assistant message')
    return messages[0]["content"]


def _turns_equal(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _from_trl(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str, dict[str, Any]]:
    if "prompt" not in record or record["prompt"] is None:
        # implicit prompt: chosen and rejected are whole conversations sharing all but the last turn
        _require(record, ("chosen", "rejected"), "trl")
        if isinstance(record["chosen"], str):
            raise _RowError('missing field "prompt"; TRL pairs with string replies need a prompt '
                            "(or use HH-RLHF dialogues with \\n\\nHuman:/\\n\\nAssistant: turns)")
        chosen = _messages(record["chosen"], "chosen")
        rejected = _messages(record["rejected"], "rejected")
        if len(chosen) < 2 or len(rejected) < 2:
            raise _RowError('missing field "prompt"; without it "chosen" and "rejected" must be full '
                            "conversations (prompt messages, then the assistant reply)")
        if not _turns_equal(chosen[:-1], rejected[:-1]):
            raise _RowError('"chosen" and "rejected" conversations differ before their final reply; '
                            'they must share the prompt turns (or give the prompt in a "prompt" field)')
        prompt = chosen[:-1]
        return prompt, _reply(chosen[-1:], prompt, "chosen"), _reply(rejected[-1:], prompt, "rejected"), {}
    _require(record, ("prompt", "chosen", "rejected"), "trl")
    prompt = _messages(record["prompt"], "prompt")
    return prompt, _reply(record["chosen"], prompt, "chosen"), _reply(record["rejected"], prompt, "rejected"), {}


def _hh_turns(text: str, name: str) -> list[dict[str, str]]:
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise _RowError(f'"{name}" has no "\\n\\nHuman:"/"\\n\\nAssistant:" turns; HH-RLHF dialogues need '
                        'them (for plain replies use the TRL format with a "prompt" field)')
    if parts[0].strip():
        raise _RowError(f'"{name}" has text before its first "Human:" turn; start the dialogue with "\\n\\nHuman: "')
    return [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _from_hh(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str, dict[str, Any]]:
    _require(record, ("chosen", "rejected"), "hh-rlhf")
    dialogues = {}
    for name in ("chosen", "rejected"):
        if not isinstance(record[name], str):
            raise _RowError(f'"{name}" must be a dialogue string in the HH-RLHF format, got {_type(record[name])}')
        turns = _hh_turns(record[name], name)
        if turns[-1]["role"] != "assistant":
            raise _RowError(f'"{name}" dialogue ends with a Human turn; it must end with the Assistant reply')
        dialogues[name] = turns
    prompt = dialogues["chosen"][:-1]
    if not _turns_equal(prompt, dialogues["rejected"][:-1]):
        raise _RowError('"chosen" and "rejected" dialogues differ before their final Assistant reply; '
                        "both must repeat the same conversation")
    return prompt, dialogues["chosen"][-1]["content"], dialogues["rejected"][-1]["content"], {}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(f'"{name}" must be a finite number, got {value!r}')
    return float(value)


def _from_ultrafeedback(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str, dict[str, Any]]:
    if "instruction" in record and "completions" in record:  # raw UltraFeedback
        _require(record, ("instruction", "completions"), "ultrafeedback")
        if not isinstance(record["instruction"], str):
            raise _RowError(f'"instruction" must be a string, got {_type(record["instruction"])}')
        completions = record["completions"]
        if not isinstance(completions, list) or len(completions) < 2:
            raise _RowError('"completions" must be a list of at least two {"response", "overall_score"} objects')
        scored = []
        for i, c in enumerate(completions, start=1):
            if not isinstance(c, dict) or not isinstance(c.get("response"), str):
                raise _RowError(f'completion {i} needs a "response" string')
            score = c.get("overall_score", c.get("fine-grained_score"))
            if score is None:
                raise _RowError(f'completion {i} has no "overall_score"; add one or drop the row')
            scored.append((_number(score, f"completion {i} overall_score"), i, c))
        best = max(scored, key=lambda s: (s[0], -s[1]))  # first of the best
        worst = min(scored, key=lambda s: (s[0], s[1]))  # first of the worst
        if best[0] == worst[0]:
            raise _RowError("all completions have the same overall_score, so there is no preference; drop the row")
        meta: dict[str, Any] = {"score_chosen": best[0], "score_rejected": worst[0]}
        for key, entry in (("model_chosen", best[2]), ("model_rejected", worst[2])):
            if isinstance(entry.get("model"), str):
                meta[key] = entry["model"]
        return _messages(record["instruction"], "instruction"), best[2]["response"], worst[2]["response"], meta
    prompt, chosen, rejected, meta = _from_trl(record)
    for key in ("score_chosen", "score_rejected"):
        if record.get(key) is not None:
            meta[key] = _number(record[key], key)
    if isinstance(record.get("prompt_id"), str):
        meta["prompt_id"] = record["prompt_id"]
    return prompt, chosen, rejected, meta


def _from_own(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str, dict[str, Any]]:
    _require(record, ("id", "prompt", "chosen", "rejected"), "alignscope")
    prompt = _messages(record["prompt"], "prompt")
    return prompt, record["chosen"], record["rejected"], {}


_CONVERTERS = {"alignscope": _from_own, "trl": _from_trl, "hh-rlhf": _from_hh, "ultrafeedback": _from_ultrafeedback}


def _own_extras(record: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
    planted = record.get("planted", False)
    if isinstance(planted, str) and planted.strip().lower() in ("true", "false", "1", "0", ""):
        planted = planted.strip().lower() in ("true", "1")
    if not isinstance(planted, bool) and planted not in (0, 1):
        raise _RowError(f'"planted" must be true or false, got {planted!r}')
    group = record.get("group")
    if group == "" or (isinstance(group, float) and math.isnan(group)):
        group = None
    if group is not None and not isinstance(group, str):
        raise _RowError(f'"group" must be a string or null, got {_type(group)}')
    meta = record.get("meta")
    if meta is None or meta == "":
        meta = {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise _RowError(f'"meta" is not valid JSON ({exc.msg})') from None
    if not isinstance(meta, dict):
        raise _RowError(f'"meta" must be an object, got {_type(meta)}')
    return bool(planted), group, meta


def _convert(record: Any, fmt: str, default_id: str, position: dict[str, Any]) -> PreferencePair:
    if not isinstance(record, dict):
        raise _RowError(f"expected a JSON object, got {_type(record)}")
    prompt, chosen, rejected, meta = _CONVERTERS[fmt](record)
    _check_prompt(prompt)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        _check_reply(value, name)
    if _same(chosen, rejected):
        raise _RowError('"chosen" and "rejected" are identical; a pair needs two different replies, '
                        "fix one of them or drop the row")
    raw_id = record.get("id")
    if raw_id is None or raw_id == "":
        if fmt == "alignscope":
            raise _RowError('"id" is empty; every exported pair needs a unique id')
        pair_id = default_id
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise _RowError(f'"id" must be a string or an integer, got {_type(raw_id)}')
    else:
        pair_id = str(raw_id)
    if fmt == "alignscope":
        planted, group, meta = _own_extras(record)
    else:
        planted, group = False, None
        meta = {"format": fmt, **position, **meta}
    return PreferencePair(id=pair_id, prompt=tuple(prompt), chosen=chosen, rejected=rejected,
                          planted=planted, group=group, meta=meta)


# --------------------------------------------------------------------------- readers


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    text = _read_text(path)
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may contain
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                             "each line must be one JSON object") from None
        yield "line", number, record


def _json_records(path: Path, split: str) -> Iterator[tuple[str, int, Any]]:
    text = _read_text(path)
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}); fix the file "
                         "(for one object per line, name it .jsonl)") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        key = split if split in lists else ("data" if "data" in lists else None)
        if key is None and len(lists) == 1 and len(data) == 1:
            key = next(iter(lists))
        if key is None:
            raise InputError(f"{path}: expected a JSON list of pair objects (or an object holding one list "
                             f'under "{split}" or "data"); found an object with keys {", ".join(list(data)[:8])}')
        data = data[key]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of pair objects, found {_type(data)}")
    for number, record in enumerate(data, start=1):
        yield "record", number, record


_JSON_CELLS = ("prompt", "chosen", "rejected", "completions", "meta")


def _csv_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    text = _read_text(path)
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # long replies are valid data; the trainer truncates them
    try:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header: list[str] | None = None
        start = 1
        rows: list[tuple[int, list[str]]] = []
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    if header is None:
                        header = [h.strip() for h in row]
                    else:
                        rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise InputError(f"{path}: line {start}: malformed CSV ({exc}); check the quotes of the row "
                             "starting there") from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        return
    for number, row in rows:
        if len(row) != len(header):
            raise InputError(f"{path}: line {number}: expected {len(header)} fields, found {len(row)}; "
                             "quote any value that contains a comma or a line break")
        record: dict[str, Any] = dict(zip(header, row))
        for name in _JSON_CELLS:
            cell = record.get(name)
            if isinstance(cell, str) and cell.lstrip()[:1] in ("[", "{"):
                try:
                    parsed = json.loads(cell)
                except json.JSONDecodeError:
                    continue  # a reply that merely starts with a bracket
                if isinstance(parsed, dict) or (isinstance(parsed, list) and parsed
                                                and all(isinstance(m, dict) for m in parsed)):
                    record[name] = parsed
        yield "line", number, record


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (from parquet / datasets) to plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _parquet_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc}); re-export it with "
                         "DataFrame.to_parquet or pass a .jsonl file") from None
    for batch in table.to_batches(max_chunksize=1024):
        for record in batch.to_pylist():
            yield "row", 0, record  # numbered by the caller


def _hub_records(source: str, split: str) -> Iterator[tuple[str, int, Any]]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(source, split=split)
    except Exception as exc:  # offline: OfflineModeIsEnabled / ConnectionError / DatasetNotFoundError
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"{source}: not a local file, and loading it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {reason}); the hub is unreachable here or the id/split is wrong. "
            "Download the data and pass a local .jsonl/.json/.csv/.parquet file"
        ) from None
    for record in dataset:
        yield "row", 0, _plain(record)


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", source)) and "/" in source


def load_preferences(source: str | Path, format: str = "auto", split: str = "train",
                     limit: int | None = None,
                     on_invalid: Literal["raise", "skip"] = "raise") -> list[PreferencePair]:
    """Read preference pairs from a file or a hub dataset, validated.

    Args:
        source: a ``.jsonl``/``.ndjson``, ``.json``, ``.csv`` or ``.parquet`` file, or a Hugging Face
            hub dataset id (``owner/name``).
        format: ``"auto"`` (from the first record's fields) or one of :data:`FORMATS`.
        split: the split of a hub dataset (or the key holding the list in a ``.json`` object).
        limit: stop after this many valid pairs (the first ones, in file order).
        on_invalid: ``"raise"`` (default) stops at the first bad record; ``"skip"`` drops bad records
            and emits one warning with their count and the first problem (for large scraped sets).

    Pairs without an ``id`` get ``"<file stem>-<line>"`` (the line or row where they start), so an
    attribution ranking points back into the file.

    Raises:
        InputError: one line naming the file, the 1-based line (``.jsonl``/``.csv``), record
            (``.json``) or row (``.parquet``/hub), what is wrong and how to fix it: missing file,
            empty file, non-UTF-8 bytes, invalid JSON, unknown format, missing field, wrong type,
            empty prompt/reply, chosen == rejected, duplicate id.
    """
    if format != "auto":
        fmt = _ALIASES.get(format.lower(), format.lower())
        if fmt not in FORMATS:
            raise InputError(f"unknown preference format {format!r}; use auto or one of: {', '.join(FORMATS)}")
    else:
        fmt = "auto"
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit {limit!r}: must be a positive number of pairs")
    if on_invalid not in ("raise", "skip"):
        raise InputError(f"on_invalid {on_invalid!r}: use 'raise' or 'skip'")

    path = Path(source)
    kind = _FILE_SUFFIXES.get(path.suffix.lower())
    if path.exists():
        if path.is_dir():
            raise InputError(f"{path}: is a directory; pass a .jsonl, .json, .csv or .parquet file")
        if kind is None:
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        records = {"jsonl": lambda: _jsonl_records(path), "json": lambda: _json_records(path, split),
                   "csv": lambda: _csv_records(path), "parquet": lambda: _parquet_records(path)}[kind]()
        label, stem = str(path), path.stem
    elif kind is None and isinstance(source, str) and _looks_like_hub_id(source):
        records = _hub_records(source, split)
        label, stem = f"{source} [{split}]", f"{source.rsplit('/', 1)[-1]}-{split}"
    else:
        raise InputError(f"{path}: file not found; pass an existing .jsonl/.json/.csv/.parquet file "
                         "or a hub dataset id like owner/name")

    pairs: list[PreferencePair] = []
    seen: dict[str, str] = {}
    skipped: list[str] = []
    count = 0
    for count, (unit, number, record) in enumerate(records, start=1):
        number = number or count
        where = f"{unit} {number}"
        try:
            if fmt == "auto":
                if not isinstance(record, dict):
                    raise _RowError(f"expected a JSON object, got {_type(record)}")
                fmt = _detect(record)
            key = "line" if unit == "line" else "row"
            pair = _convert(record, fmt, f"{stem}-{number}", {key: number})
            if pair.id in seen:
                raise _RowError(f"duplicate id {pair.id!r} (first used at {seen[pair.id]}); ids must be unique")
        except (_RowError, InputError) as exc:
            message = str(exc)
            if on_invalid == "skip" and fmt != "auto":
                skipped.append(f"{where}: {message}")
                continue
            raise InputError(f"{label}: {where}: {message}") from None
        seen[pair.id] = where
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if count == 0:
        raise InputError(f"{label}: the file is empty; it needs preference pairs (e.g. one JSON object per line "
                         'with "prompt", "chosen" and "rejected")')
    if skipped:
        warnings.warn(f"{label}: skipped {len(skipped)} invalid record(s); first: {skipped[0]}", stacklevel=2)
    if not pairs:
        raise InputError(f"{label}: no valid preference pairs (all {len(skipped)} records were invalid; "
                         f"first: {skipped[0] if skipped else '-'})")
    return pairs


# --------------------------------------------------------------------------- export and identity


def preferences_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """A content hash of the pairs, in order (reordering changes it; so does any field, meta included).

    Used in artefact keys (reference log-prob cache, training stages), so equal data is a cache hit
    whatever file it came from.
    """
    return content_hash([p.to_dict() for p in pairs], length=32)


def pairs_to_frame(pairs: Iterable[PreferencePair]) -> pd.DataFrame:
    """One row per pair: ``id, prompt, chosen, rejected, planted, group, meta`` (prompt as message
    lists, meta as dicts)."""
    rows = [p.to_dict() for p in pairs]
    frame = pd.DataFrame(rows, columns=list(_OWN_FIELDS))
    frame["planted"] = frame["planted"].astype(bool)
    return frame


#: Same as :func:`pairs_to_frame` (a frame from pairs).
frame_from_pairs = pairs_to_frame


def pairs_from_frame(frame: pd.DataFrame) -> list[PreferencePair]:
    """The inverse of :func:`pairs_to_frame` (``meta`` may be dicts or JSON strings)."""
    missing = [c for c in ("id", "prompt", "chosen", "rejected") if c not in frame.columns]
    if missing:
        raise InputError(f"preference frame lacks column(s) {', '.join(missing)}; it needs id, prompt, chosen, rejected")
    pairs = []
    for number, record in enumerate(frame.to_dict(orient="records"), start=1):
        record = _plain(record)
        try:
            pairs.append(_convert(record, "alignscope", str(number), {}))
        except _RowError as exc:
            raise InputError(f"preference frame: row {number}: {exc}") from None
    return pairs


def write_preferences(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    """Write pairs atomically in the ``alignscope`` format: ``.jsonl`` or ``.parquet`` by suffix.

    Reading the file back with :func:`load_preferences` gives equal pairs (planted, group and meta
    included). In Parquet, ``prompt`` is a list of ``{role, content}`` structs and ``meta`` a JSON
    string (its keys differ between rows).
    """
    path = Path(path)
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"cannot write {path}: duplicate pair id {dup!r}; ids must be unique")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        lines = [json.dumps(p.to_dict(), ensure_ascii=False, allow_nan=False) for p in pairs]
        atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    elif suffix == ".parquet":
        frame = pairs_to_frame(pairs)
        frame["meta"] = [json.dumps(m, ensure_ascii=False, sort_keys=True, allow_nan=False) for m in frame["meta"]]
        atomic_write_parquet(path, frame)
    else:
        raise InputError(f"cannot write {path}: use a .jsonl or .parquet file name")
    return path


def to_trl_rows(pairs: Iterable[PreferencePair]) -> list[dict[str, Any]]:
    """TRL's conversational preference rows: ``prompt`` messages, ``chosen``/``rejected`` as one
    assistant message each, plus ``id`` (for ``datasets.Dataset.from_list``)."""
    return [{"id": p.id, "prompt": [dict(m) for m in p.prompt],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
