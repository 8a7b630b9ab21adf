"""Under ``accelerate launch`` with 2 CPU processes the engine shards work and gathers it in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port

pytestmark = pytest.mark.multiproc


def accelerate_cmd(num_processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes == 1:
        return [sys.executable, "-m"]
    return launcher + ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(), "-m"]


def test_two_cpu_processes_give_the_same_scores(tiny_model_dir: Path, tmp_path: Path):
    lines = [json.dumps({"context": f"Item {i // 3} says", "continuation": f" word{i}"}) for i in range(23)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    frames = []
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cmd = accelerate_cmd(n) + ["alignscope.cli", "score", "--model", str(tiny_model_dir), "--requests",
                                   str(tmp_path / "r.jsonl"), "--out", str(out), "--no-cache", "--dtype", "float32"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        [path] = list((out / "score").glob("*/scores.parquet"))
        frames.append(pd.read_parquet(path))
        assert json.loads((path.parent / "summary.json").read_text())["processes"] == n
    one, two = frames
    assert list(one["id"]) == list(two["id"]) == [str(i) for i in range(23)]
    assert one["logprob"].tolist() == pytest.approx(two["logprob"].tolist(), abs=1e-5)
