"""SIGKILL at a seeded random point, then rerun: the result equals an uninterrupted run.

SIGKILL is the hard case (no ``finally``, no atexit, no flush): it is what the OOM killer, a
preempted job or a closed laptop does. The guarantees under test:

* nothing half-built looks finished (no ``.done`` artefact from the killed run);
* the rerun of the same command completes (resuming training from the last checkpoint, reusing
  finished audit probes and cached engine results);
* its results equal an uninterrupted run's: audit item scores exactly, adapter weights within the
  training tolerance of docs/reliability.md.

The reference run uses its own empty cache directory, so the comparison is also a cross-process
determinism check.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_determinism import TRAINING_TOLERANCE, max_adapter_difference

SEED = int(os.environ.get("ALIGNSCOPE_KILL_SEED", "7"))  # change it to kill at other points
TOPICS = ["tea", "rain", "maps", "bread", "chess", "moss", "kites", "owls"]


def _cli(args: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, "ALIGNSCOPE_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "alignscope.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen, jitter: float) -> None:
    time.sleep(jitter)
    assert proc.poll() is None, "the run ended before it could be killed; lower the jitter"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _no_finished_partials(run: Path) -> None:
    for partial in run.rglob("*.partial"):
        assert not (partial / ".done").exists(), partial


# --------------------------------------------------------------------------- audit


AUDIT_PROBES = "crows_pairs,stereoset,winobias"


def _audit_args(model: Path, out: Path) -> list[str]:
    return ["audit", "--model", str(model), "--probes", AUDIT_PROBES, "--limit", "24", "--dtype", "float32",
            "--out", str(out)]


def _items(run: Path) -> dict[str, pd.DataFrame]:
    manifest = json.loads((run / "manifest.json").read_text())
    return {stage: pd.read_parquet(run / entry["path"] / "items.parquet")
            for stage, entry in manifest["artefacts"].items() if stage.startswith("audit_")}


def test_killed_audit_reruns_to_the_same_item_scores(tiny_model_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cache = tmp_path / "cache"
    killed = tmp_path / "killed"
    proc = _cli(_audit_args(tiny_model_dir, killed), cache)
    # kill point: after a seeded number (0 or 1) of probes have finished, plus a seeded delay
    finished_before_kill = rng.choice([0, 1])

    def reached() -> bool:
        if finished_before_kill == 0:
            return killed.is_dir()
        manifest = killed / "manifest.json"
        return manifest.exists() and len(json.loads(manifest.read_text()).get("artefacts", {})) >= 1

    _wait_for(reached, proc)
    _kill(proc, rng.uniform(0.0, 0.3))  # short: on a fast CPU the other two probes take about a second
    _no_finished_partials(killed)

    _finish(_cli(_audit_args(tiny_model_dir, killed), cache))
    reference = tmp_path / "reference"
    _finish(_cli(_audit_args(tiny_model_dir, reference), tmp_path / "fresh-cache"))

    got, want = _items(killed), _items(reference)
    assert got.keys() == want.keys() and len(got) == 3
    for stage in want:
        pd.testing.assert_frame_equal(got[stage], want[stage], check_exact=True)


# --------------------------------------------------------------------------- align

STAGE_YAML = """\
method: dpo
max_steps: 20
per_device_train_batch_size: 2
max_length: 40
dtype: float32
learning_rate: 1.0e-3
save_steps: 1
save_total_limit: 2
seed: 5
"""


def _align_args(model: Path, out: Path, data: Path, config: Path) -> list[str]:
    return ["align", "--model", str(model), "--config", str(config), "--data", str(data), "--out", str(out)]


def test_killed_align_resumes_to_the_same_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data, config = tmp_path / "pairs.jsonl", tmp_path / "dpo.yaml"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": [{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": f"Tell me about {t}."}],
                                        "chosen": "Sure thing.", "rejected": f"No, {t} is dull."}) + "\n"
                            for i, t in enumerate(TOPICS)))
    config.write_text(STAGE_YAML)
    killed = tmp_path / "killed"
    cache = tmp_path / "cache"
    proc = _cli(_align_args(tiny_model_dir, killed, data, config), cache)
    step = rng.randint(1, 4)  # kill after checkpoint-<step> exists, of 20 (a fast CPU runs ~10 steps/s here)
    _wait_for(lambda: any(killed.glob(f".work/align/*/checkpoint-{step}/trainer_state.json")), proc)
    _kill(proc, rng.uniform(0.0, 0.3))
    assert not list(killed.glob("align/*/.done"))
    _no_finished_partials(killed)

    _finish(_cli(_align_args(tiny_model_dir, killed, data, config), cache))
    reference = tmp_path / "reference"
    _finish(_cli(_align_args(tiny_model_dir, reference, data, config), tmp_path / "fresh-cache"))

    [resumed] = [p.parent for p in killed.glob("align/*/.done")]
    [clean] = [p.parent for p in reference.glob("align/*/.done")]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 20 and (summary["resumed_from_step"] or 0) >= step
    records = [json.loads(x) for x in (resumed / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))  # each step's loss exactly once
    diff = max_adapter_difference(resumed / "adapter", clean / "adapter")
    print(f"killed after checkpoint-{step}: max abs adapter difference vs uninterrupted run: {diff:.3g}")
    assert diff <= TRAINING_TOLERANCE


def _study_values(run: Path) -> dict[str, object]:
    """What a study computed: planted-probe item scores per model, attribution scores, the curve."""
    record = json.loads((run / "study.json").read_text())
    out: dict[str, object] = {}
    for label, rel in record["audits"].items():
        items = sorted((run / rel).glob("audit_planted_bias/*/items.parquet"))
        out[f"audit:{label}"] = pd.read_parquet(items[-1])["gap"].round(5).tolist()
    scores = pd.read_parquet(run / record["attribution"] / "scores.parquet")
    out["attribution"] = list(zip(scores["pair_id"], scores["rank"]))
    curve = pd.read_parquet(run / record["curation"] / "curve.parquet")
    out["curve"] = curve[["label", "planted_dropped"]].values.tolist()
    return out


def test_killed_study_resumes_to_the_same_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL a quick study on the tiny model once a seeded number of steps are done (plus a seeded
    delay into the next step); the rerun finishes and equals an uninterrupted study."""
    config = tmp_path / "study.yaml"
    config.write_text(f"model: {tiny_model_dir}\nseed: 5\n", encoding="utf-8")
    rng = random.Random(SEED)
    steps_done, jitter = rng.randint(1, 5), rng.uniform(0.0, 0.5)  # a fast CPU finishes a quick step in ~1 s

    reference = tmp_path / "reference"
    _finish(_cli(["study", str(config), "--quick", "--out", str(reference)], tmp_path / "cache-reference"))

    killed = tmp_path / "killed"
    cache = tmp_path / "cache-killed"
    proc = _cli(["study", str(config), "--quick", "--out", str(killed)], cache)

    def enough_steps() -> bool:
        record = killed / "study.json"
        try:
            return len(json.loads(record.read_text())["stages"]) >= steps_done
        except (OSError, ValueError, KeyError):
            return False

    _wait_for(enough_steps, proc)
    _kill(proc, jitter)
    assert not (killed / "report.html").exists()
    _finish(_cli(["study", str(config), "--quick", "--out", str(killed)], cache))
    assert _study_values(killed) == _study_values(reference)


def test_a_checkpoint_killed_while_saving_is_skipped_and_removed(tmp_path: Path) -> None:
    """CI found it: a kill during a save leaves checkpoint-N without trainer_state.json (written last)."""
    from alignscope.align.stage import _last_complete_checkpoint

    assert _last_complete_checkpoint(tmp_path) is None
    for step, state in [(2, "{}"), (10, "{}"), (12, None), (14, '{"trunc')]:
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (ckpt / "trainer_state.json").write_text(state)
    assert _last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # numeric, not lexical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2"]


def test_a_stage_killed_after_its_final_checkpoint_is_loaded_not_trained_again(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """CI found it on a fast machine: killed between the last checkpoint and the stage's own save,
    a resumed Trainer ran a 7th step of 6. The finished checkpoint must be loaded as it is."""
    from test_align import adapter_tensors, easy_pairs, log_lines
    from transformers import TrainerCallback

    from alignscope.align import StageConfig, train_stage

    class KilledAfterFinalSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                raise KeyboardInterrupt("killed after the last checkpoint")

    # 6 steps of 4 per epoch: the plan ends mid-epoch, which is when the extra step happened
    cfg = StageConfig(method="dpo", max_steps=6, per_device_train_batch_size=2, max_length=40, dtype="float32",
                      learning_rate=1e-3, save_steps=1, save_total_limit=2, seed=5)
    pairs = easy_pairs(8)
    with pytest.raises(KeyboardInterrupt):
        train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "killed", callbacks=[KilledAfterFinalSave()])
    assert list((tmp_path / "killed").glob(".work/align/*/checkpoint-6/trainer_state.json"))
    resumed = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "killed")
    clean = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "clean")
    assert resumed.summary["steps"] == 6 and resumed.summary["resumed_from_step"] == 6
    assert [r["step"] for r in log_lines(resumed) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    got, want = adapter_tensors(resumed), adapter_tensors(clean)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=TRAINING_TOLERANCE)
