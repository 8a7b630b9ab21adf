"""The engine: the only way probes reach a model.

It owns what every probe would otherwise redo: a persistent result cache keyed by the model's
fingerprint, sharding across ``accelerate launch`` processes, and handing batches to a backend.
Backends (``hf`` now; vLLM later) only turn requests into numbers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from alignscope.models.hf_backend import HFBackend
from alignscope.models.loading import LoadedModel
from alignscope.models.requests import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from alignscope.store import content_hash, default_cache_dir

# Bump when a change would alter stored numbers, so old cache entries stop matching.
ENGINE_VERSION = "2"  # 2: own decode loop with shared prompts and per-sample generators


class Backend(Protocol):
    """What a backend must do. Probes never see it; the engine calls it on cache misses."""

    name: str

    def score(self, requests: Sequence[ScoreRequest], progress: bool = True) -> list[ScoreResult]: ...

    def generate(self, requests: Sequence[GenerateRequest], progress: bool = True) -> list[GenerateResult]: ...


class ResultCache:
    """Content-addressed results in SQLite: safe for concurrent processes and atomic per write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        conn = self._connect()
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in conn.execute(f"SELECT key, value FROM results WHERE key IN ({marks})", chunk):
                found[key] = json.loads(value)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        with self._connect() as conn:  # one transaction: all or nothing
            conn.executemany(
                "INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in items.items()],
            )

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM results").fetchone()[0])


class Engine:
    """Score and generate with caching, sharding and batching in one place.

    Args:
        lm: the loaded model.
        batch_tokens: token budget per forward pass (padded rows × longest row).
        share_context: compute shared contexts (and common beginnings of contexts) once.
        share_prompt: generate with the engine's decode loop (each prompt run once, its cache
            repeated for the k samples); False uses transformers' ``generate``.
        threads: torch threads per model pass: ``"auto"`` (default) uses the cores other
            processes leave free at that moment (1 on a busy shared machine, all when idle), an
            integer fixes it, None keeps torch's setting.
        cache: a ``ResultCache``, ``None`` for no cache, or ``"default"`` for the user cache dir.
        progress: show progress bars (only on the main process).
    """

    def __init__(self, lm: LoadedModel, batch_tokens: int = 4096, share_context: bool = True,
                 cache: ResultCache | str | None = "default", progress: bool = True,
                 backend: Backend | None = None, share_prompt: bool = True,
                 threads: int | str | None = "auto") -> None:
        self.lm = lm
        self.backend: Backend = backend or HFBackend(lm, batch_tokens=batch_tokens, share_context=share_context,
                                                     share_prompt=share_prompt, threads=threads)
        if cache == "default":
            cache = ResultCache(default_cache_dir() / "engine.sqlite")
        self.cache = cache if isinstance(cache, ResultCache) else None
        self.progress = progress
        self.backend_calls = 0  # how many requests actually reached the model (for cache tests)

    def _key(self, kind: str, request: ScoreRequest | GenerateRequest) -> str:
        return content_hash({"v": ENGINE_VERSION, "backend": self.backend.name, "model": self.lm.fingerprint,
                             "kind": kind, "request": request.to_dict()}, length=32)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return self._run("score", requests, self.backend.score, ScoreResult.from_dict)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return self._run("generate", requests, self.backend.generate, GenerateResult.from_dict)

    def _run(self, kind: str, requests: Sequence[Any], compute: Any, decode: Any) -> list[Any]:
        requests = list(requests)
        keys = [self._key(kind, r) for r in requests]
        known = self.cache.get_many(keys) if self.cache is not None else {}
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        first_of = {k: i for i, k in reversed(list(enumerate(keys)))}
        todo = [first_of[k] for k in missing]
        state = _distributed_state()
        mine = todo[state.process_index::state.num_processes] if state else todo
        show = self.progress and (state is None or state.is_main_process)
        computed = compute([requests[i] for i in mine], progress=show) if mine else []
        self.backend_calls += len(mine)
        fresh = {keys[i]: res.to_dict() for i, res in zip(mine, computed)}
        if state is not None:
            from accelerate.utils import gather_object

            merged: dict[str, Any] = {}
            for part in gather_object([fresh]):
                merged.update(part)
            fresh = merged
        if self.cache is not None and (state is None or state.is_main_process):
            self.cache.put_many(fresh)
        known.update(fresh)
        return [decode(known[k]) for k in keys]


def _distributed_state() -> Any:
    """The accelerate state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate falls back to a single-process state on CPU-only machines.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def num_processes() -> int:
    state = _distributed_state()
    return 1 if state is None else int(state.num_processes)


def is_main_process() -> bool:
    """True unless this is a non-zero rank under ``accelerate launch`` (only rank 0 writes files)."""
    state = _distributed_state()
    return state is None or bool(state.is_main_process)
