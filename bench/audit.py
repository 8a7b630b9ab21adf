"""Audit benchmark: per-probe time of the full default audit, fresh result cache, one run.

Runs the probes `alignscope audit` runs by default (every probe with embedded data, in the CLI's
order, so later probes reuse what earlier ones put in the engine's result cache — as a real audit
does) on one model, with an empty engine result cache, and records per probe the wall time, the
CPU time of this process (all threads) and the machine's load average before and after. The
converted model checkpoint is reused; only results are recomputed.

    .venv/bin/python bench/audit.py [--model smollm2-135m] [--probes all] [--limit N]

Writes JSON (default ``bench/results/audit.json``) and prints a table. On a shared machine read
the CPU column next to the wall column: wall/CPU far above 1/threads means the run was starved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--probes", default="all", help="comma-separated probe names, or 'all' (the CLI default)")
    parser.add_argument("--limit", type=int, default=None, help="items per probe (default: the full default audit)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/audit.json"))
    args = parser.parse_args()

    import torch

    from alignscope.audit.runner import audit, available_probes, parse_probe_names
    from alignscope.models import Engine, load
    from alignscope.models.engine import ResultCache

    defaults = [n for n, p in available_probes().items() if not p.requires_data]
    names = parse_probe_names(defaults if args.probes == "all" else args.probes)

    started = time.perf_counter()
    cpu_started = time.process_time()
    lm = load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - started
    rows = []
    with tempfile.TemporaryDirectory(prefix="alignscope-bench-audit-") as tmp:
        engine = Engine(lm, batch_tokens=args.batch_tokens, cache=ResultCache(Path(tmp) / "engine.sqlite"),
                        progress=False)
        for name in names:
            load_before = os.getloadavg()[0]
            wall0, cpu0 = time.perf_counter(), time.process_time()
            calls0 = engine.backend_calls
            done = audit(engine, [name], Path(tmp) / "run", limit=args.limit, seed=args.seed)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            summary = json.loads(done[name].file("summary.json").read_text())
            rows.append({"probe": name, "n_items": summary["n_items"], "wall_s": round(wall, 2),
                         "cpu_s": round(cpu, 2), "requests_computed": engine.backend_calls - calls0,
                         "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                         "metrics": {k: v["value"] for k, v in summary["metrics"].items()},
                         "notes": summary["notes"]})
            print(f"{name:24s} {summary['n_items']:5d} items  wall {wall:7.1f}s  cpu {cpu:7.1f}s  "
                  f"load {load_before:.1f}->{rows[-1]['load_after']:.1f}", flush=True)
    total_wall = time.perf_counter() - started
    total_cpu = time.process_time() - cpu_started
    result = {
        "benchmark": "audit", "model": args.model, "dtype": str(lm.dtype), "limit": args.limit,
        "batch_tokens": args.batch_tokens, "seed": args.seed, "probes": names,
        "load_s": round(load_s, 2), "total_wall_s": round(total_wall, 2), "total_cpu_s": round(total_cpu, 2),
        "per_probe": rows, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "commit": _git_commit(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"total (incl. model load {load_s:.1f}s): wall {total_wall:.1f}s ({total_wall / 60:.1f} min), "
          f"cpu {total_cpu:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
