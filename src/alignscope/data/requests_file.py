"""Reading raw engine requests (``alignscope score --requests FILE.jsonl``) with line-exact errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignscope.errors import InputError
from alignscope.models.requests import ScoreRequest

_FIELDS = {"id", "context", "continuation", "chat", "system"}


def read_score_requests(path: Path) -> tuple[list[ScoreRequest], list[Any]]:
    """Parse ``{"context", "continuation"[, "id", "chat", "system"]}`` JSON lines.

    Returns the requests and their ids (the 0-based line index when a line has no ``id``).
    Every problem names the file and the 1-based line, and says how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"requests file {path}: not found; pass an existing .jsonl file with --requests")
    requests: list[ScoreRequest] = []
    ids: list[Any] = []
    numbers: list[int] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                             "write one JSON object per line") from exc
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object like "
                             '{"context": "...", "continuation": "..."}')
        for field in ("context", "continuation"):
            if field not in record:
                raise InputError(f"{where}: missing field {field!r}; every line needs "
                                 '"context" and "continuation"')
            if not isinstance(record[field], str):
                raise InputError(f"{where}: field {field!r} must be a string")
        if not record["continuation"]:
            raise InputError(f"{where}: empty continuation; give the text to score after the context")
        unknown = set(record) - _FIELDS
        if unknown:
            raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        requests.append(ScoreRequest(context=record["context"], continuation=record["continuation"],
                                     chat=bool(record.get("chat", False)), system=record.get("system")))
        ids.append(record.get("id", number - 1))
        numbers.append(number)
    if not requests:
        raise InputError(f"{path}: no requests (the file is empty); add JSON lines with context and continuation")
    first_line: dict[str, int] = {}
    for request_id, number in zip(map(str, ids), numbers):
        if request_id in first_line:
            raise InputError(f"{path} line {number}: duplicate id {request_id!r} (first used on line "
                             f"{first_line[request_id]}); give every line a unique \"id\" or leave ids out")
        first_line[request_id] = number
    return requests, ids
