"""A DPO stage under ``accelerate launch`` with 2 CPU processes (gloo): it trains, writes one
artefact, and its reference cache (sharded, then gathered) equals the single-process one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port

from alignscope.align import align_command, stage_reference
from alignscope.data.preferences import PreferencePair, write_preferences

pytestmark = pytest.mark.multiproc

CONFIG = ("method: dpo\nper_device_train_batch_size: 2\nmax_length: 40\ndtype: float32\n"
          "learning_rate: 1.0e-3\nprecompute_ref_batch_size: 2\n")

WORKER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    from alignscope.align import align_command

    model, data, out, config, answers = sys.argv[1:6]
    path = align_command(model, None, data, out, config=config, max_steps=2)
    # One file per rank: both ranks printing to the launcher's stdout can interleave mid-line.
    Path(answers, f"rank-{os.environ['RANK']}.txt").write_text(str(path))
""")


def test_dpo_stage_under_accelerate_with_two_cpu_processes(tiny_model_dir: Path, tmp_path: Path):
    system = {"role": "system", "content": "Be brief."}
    pairs = [PreferencePair(id=f"d{i}", prompt=(system, {"role": "user", "content": f"Item {i}?"}),
                            chosen="Sure thing.", rejected=f"No, item {i} is dull.") for i in range(7)]
    data = write_preferences(pairs, tmp_path / "pairs.jsonl")
    config = tmp_path / "stage.yaml"
    config.write_text(CONFIG)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    answers = tmp_path / "answers"
    answers.mkdir()

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", free_port(), str(script), str(tiny_model_dir), str(data), str(tmp_path / "run2"),
           str(config), str(answers)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    returned = {f.name: f.read_text() for f in answers.iterdir()}
    assert sorted(returned) == ["rank-0.txt", "rank-1.txt"], f"stderr: {done.stderr[-2000:]!r}"
    assert len(set(returned.values())) == 1  # every rank gets the path of the one stage rank 0 wrote
    stage_dir = Path(returned["rank-0.txt"])
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert (stage_dir / "adapter" / "adapter_model.safetensors").exists()
    assert len(list((tmp_path / "run2" / "align").iterdir())) == 1  # one artefact, written by rank 0 only
    logs = [json.loads(x) for x in (stage_dir / "logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs if "loss" in x] == [1, 2]  # no duplicate lines from rank 1

    two = stage_reference(stage_dir).set_index("id")
    single = align_command(str(tiny_model_dir), None, data, tmp_path / "run1", config=config, max_steps=1)
    one = stage_reference(single).set_index("id")
    assert sorted(two.index) == sorted(one.index) == sorted(p.id for p in pairs)  # padding rows dropped
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert two.loc[one.index, column].tolist() == pytest.approx(one[column].tolist(), abs=1e-4)
