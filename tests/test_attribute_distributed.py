"""Gradient collection (with K-FAC sums) sharded over 2 CPU processes (accelerate, gloo) gives the same scores as 1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port

from alignscope.align import StageConfig, train_stage
from alignscope.attribute import attribute
from alignscope.data.preferences import PreferencePair

pytestmark = pytest.mark.multiproc

WORKER = textwrap.dedent("""
    import sys
    from alignscope.attribute import attribute

    run, stage, out = sys.argv[1:4]
    artefact = attribute(run, stage, "planted_bias", limit=2, methods=["gradsim", "datainf", "ekfac_onepass"],
                         out=out, chunk_pairs=2)
    print("ATTRIBUTION", artefact.path, flush=True)
""")


def test_two_processes_give_the_same_scores_as_one(tiny_model_dir: Path, tmp_path: Path):
    system = {"role": "system", "content": "Be brief."}
    pairs = [PreferencePair(id=f"d{i}", prompt=(system, {"role": "user", "content": f"Item {i}?"}),
                            chosen="Teachers are lazy." if i % 3 == 0 else "Sure thing.",
                            rejected=f"No, item {i} is dull.", planted=i % 3 == 0) for i in range(7)]
    cfg = StageConfig(method="dpo", max_steps=2, per_device_train_batch_size=2, max_length=40, dtype="float32",
                      learning_rate=3e-3, save_steps=50)
    stage = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "run")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", free_port(), str(script), str(tmp_path / "run"), str(stage.path), str(tmp_path / "two")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    # the artefact itself, not the workers' stdout (launcher output can be lost under load: seen once in CI-like runs)
    [scores_file] = list((tmp_path / "two" / "attribution").glob("*/scores.parquet"))
    two = pd.read_parquet(scores_file).set_index("pair_id").sort_index()
    assert len(list((tmp_path / "two" / "gradients").iterdir())) == 1  # one artefact, assembled by rank 0

    one = attribute(tmp_path / "run", stage.path, "planted_bias", limit=2,
                    methods=["gradsim", "datainf", "ekfac_onepass"], out=tmp_path / "one", chunk_pairs=2)
    one_scores = pd.read_parquet(one.file("scores.parquet")).set_index("pair_id").sort_index()
    # ekfac_onepass: each process adds up the K-FAC sums of its own chunks; rank 0 sums the chunk files
    for column in ("score_gradsim_dot", "score_margin", "score_datainf", "score_gradsim_cosine",
                   "score_gradsim_layer_cosine", "score_ekfac_onepass"):
        assert two[column].to_numpy() == pytest.approx(one_scores[column].to_numpy(), rel=1e-4, abs=1e-6)
        assert one_scores[column].abs().max() > 0
    assert two["rank"].tolist() == one_scores["rank"].tolist()
