"""Two processes sharing one cache directory (and one run directory) leave both intact.

Three shared things are exercised: the built-in model conversion (file lock + atomic rename),
the engine's SQLite result cache (WAL, one transaction per batch), and the artefact store (two
processes finishing the same content-addressed artefact at once).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from alignscope import store
from alignscope.store import DONE_MARKER, atomic_directory

CONVERT = r"""
import os, sys, time
from pathlib import Path
import alignscope.models.builtin as builtin

log, start = Path(sys.argv[1]), float(sys.argv[2])

def fake_convert(gguf, target):  # the real one dequantises 135M parameters; the locking is what we test
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    with builtin.atomic_directory(target) as scratch:
        (scratch / "config.json").write_text("{}")

builtin._convert_gguf = fake_convert
builtin.BuiltinModel.gguf_path = lambda self: Path("/nonexistent/model.gguf")
while time.time() < start:
    time.sleep(0.01)
print(builtin.ensure_converted("smollm2-135m"))
"""


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "ALIGNSCOPE_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}


def test_two_processes_convert_a_builtin_once(tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    start = time.time() + 4.0  # both interpreters are up and importing by then
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(log), str(start)], env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert len(log.read_text().split()) == 1  # one converted, the other waited on the lock
    assert outs[0][0].strip() == outs[1][0].strip()
    target = cache / "models" / "smollm2-135m"
    assert (target / DONE_MARKER).exists() and (target / "config.json").exists()
    assert not [p.name for p in target.parent.iterdir() if p.name.endswith(".partial")]


def test_rival_builder_finishing_first_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the two-process test can only hit by luck, forced: between our rmtree and our rename
    another process renames the same artefact into place. Ours is dropped, theirs kept, no error."""
    final = tmp_path / "stage" / "key"
    real_replace = os.replace

    def rival_then_replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == final and not final.exists():
            final.mkdir(parents=True)
            (final / "result.txt").write_text("theirs")
            (final / DONE_MARKER).write_text("done")
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", rival_then_replace)
    with atomic_directory(final) as scratch:
        (scratch / "result.txt").write_text("ours")
    assert (final / "result.txt").read_text() == "theirs" and (final / DONE_MARKER).exists()
    assert [p.name for p in final.parent.iterdir()] == ["key"]


def test_two_processes_share_engine_cache_and_run_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two `alignscope score` runs, same requests, same --out, same cache, started together."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    requests = tmp_path / "r.jsonl"
    lines = [json.dumps({"context": f"Item {i} is", "continuation": f" number {i % 7}"}) for i in range(60)]
    requests.write_text("\n".join(lines) + "\n")
    args = [sys.executable, "-m", "alignscope.cli", "score", "--model", str(tiny_model_dir), "--requests",
            str(requests), "--out", str(out), "--dtype", "float32"]
    procs = [subprocess.Popen(args, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]

    finished = list((out / "score").glob(f"*/{DONE_MARKER}"))
    assert len(finished) == 1
    assert not [p.name for p in (out / "score").iterdir() if p.name.startswith(".")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artefacts"]["score"]["key"] == finished[0].parent.name
    frame = pd.read_parquet(finished[0].parent / "scores.parquet")
    assert len(frame) == 60 and frame["logprob"].lt(0).all()

    with sqlite3.connect(cache / "engine.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 60
        for (value,) in conn.execute("SELECT value FROM results"):
            json.loads(value)
