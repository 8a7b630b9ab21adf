"""Raw scoring into a run directory: the ``alignscope score`` stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from alignscope.models.engine import Engine, is_main_process, num_processes
from alignscope.models.requests import ScoreRequest
from alignscope.store import RunDir, atomic_write_json, atomic_write_parquet, file_hash


def score_frame(requests: Sequence[ScoreRequest], ids: Sequence[Any], engine: Engine) -> pd.DataFrame:
    """Inputs plus ``logprob``, per-token values, token ids and ``is_greedy``, in input order."""
    results = engine.score(requests)
    return pd.DataFrame({
        "id": [str(i) for i in ids],
        "context": [r.context for r in requests],
        "continuation": [r.continuation for r in requests],
        "chat": [r.chat for r in requests],
        "logprob": [x.logprob for x in results],
        "n_tokens": [len(x.token_ids) for x in results],
        "token_logprobs": [x.token_logprobs for x in results],
        "token_ids": [x.token_ids for x in results],
        "is_greedy": [x.is_greedy for x in results],
    })


def score_to_run(engine: Engine, requests: Sequence[ScoreRequest], ids: Sequence[Any],
                 source: Path, out: Path) -> Path | None:
    """Score and store ``scores.parquet``; a finished identical run is returned without work.

    Under ``accelerate launch`` every process computes its shard, only the main one writes.
    """
    inputs = {"stage": "score", "model": engine.lm.fingerprint, "model_spec": engine.lm.spec,
              "adapter": engine.lm.adapter, "dtype": str(engine.lm.dtype), "requests": file_hash(source)}
    run = RunDir(out)
    if (found := run.find("score", inputs)) is not None:  # every process sees the same answer
        return found.file("scores.parquet")
    frame = score_frame(requests, ids, engine)
    if not is_main_process():
        return None
    with run.build("score", inputs) as scratch:
        atomic_write_parquet(scratch / "scores.parquet", frame)
        atomic_write_json(scratch / "summary.json", {
            "n_requests": len(frame), "mean_logprob": float(frame["logprob"].mean()),
            "total_tokens": int(frame["n_tokens"].sum()), "model": engine.lm.spec,
            "processes": num_processes(),
        })
    return run.path("score", inputs) / "scores.parquet"
