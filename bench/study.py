"""Per-step times of a study run (the default study unless a config is given).

Runs ``alignscope study`` in a subprocess with a fresh run directory and a fresh cache (so nothing is
a cache hit: the model conversion is reused, the engine's result cache is not), then reads
``study.json`` — the same timings the report shows — and prints them as a table and as JSON.

    .venv/bin/python bench/study.py [--quick] [--config configs/x.yaml] [--out runs/bench-study]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alignscope.store import default_cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-study"))
    parser.add_argument("--keep-cache", action="store_true", help="Reuse the engine's result cache.")
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    env = dict(os.environ)
    scratch = None
    if not args.keep_cache:
        # a fresh cache that still holds the converted model (conversion is set-up, not the study)
        scratch = Path(tempfile.mkdtemp(prefix="alignscope-bench-cache-"))
        models = default_cache_dir() / "models"
        if models.is_dir():
            (scratch / "models").symlink_to(models.resolve())
        env["ALIGNSCOPE_CACHE"] = str(scratch)
    command = [sys.executable, "-m", "alignscope.cli", "study", "--out", str(args.out)]
    if args.config:
        command.insert(4, str(args.config))
    if args.quick:
        command.append("--quick")
    started = time.perf_counter()
    cpu_before = os.times()
    done = subprocess.run(command, env=env)
    cpu_after = os.times()
    wall = time.perf_counter() - started
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(f"study failed with exit code {done.returncode}")
    record = json.loads((args.out / "study.json").read_text())
    child_cpu = (cpu_after.children_user - cpu_before.children_user) + (cpu_after.children_system
                                                                         - cpu_before.children_system)
    print("\n| step | status | seconds |\n| --- | --- | --- |")
    for step in record["stages"]:
        print(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} |")
    print(f"| **total (wall, incl. model load)** | | **{wall:.1f}** |")
    print(json.dumps({"command": " ".join(command[1:]), "wall_s": round(wall, 1), "cpu_s": round(child_cpu, 1),
                      "steps": record["stages"], "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "load_avg_after": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
