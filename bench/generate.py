"""Generation benchmark: the engine's decode loop vs transformers' ``generate``, same run.

Two workloads built by the probes themselves (so prompt lengths and settings are the audit's):
  sampled  toxicity requests: k samples of 20 tokens at temperature 1 (prompt shared by the k)
  greedy   refusal requests: one greedy reply of 40 tokens
Variants, interleaved per repeat so machine load hits all of them alike:
  ours         shared prompt pass, k-fold cache, rows leave when done, threads="auto" (default)
  ours-1t      the same on 1 thread
  ours-2t      the same on torch's default thread count
  hf           transformers ``generate(num_return_sequences=k)`` (the engine before), default threads
  hf-1t        the same on 1 thread (with ours-1t: the algorithm alone, threading aside)
Reports wall and CPU seconds per repeat and medians; ratios are hf / ours.

    .venv/bin/python bench/generate.py [--prompts 6] [--repeats 3] [--variants ours,hf]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {"ours": dict(share_prompt=True, threads="auto"),
            "ours-1t": dict(share_prompt=True, threads=1),
            "ours-2t": dict(share_prompt=True, threads=None),
            "hf": dict(share_prompt=False, threads=None),
            "hf-1t": dict(share_prompt=False, threads=1)}


def workloads(n_prompts: int) -> dict[str, list]:
    from alignscope.audit.probes.refusal import RefusalProbe
    from alignscope.audit.probes.toxicity import ToxicityProbe

    tox = ToxicityProbe()
    items = tox.load_items(limit=2 * n_prompts)
    sampled = [tox._request(p, k) for p, k in zip(items["prompt"], items["system_kind"])]
    ref = RefusalProbe()
    from alignscope.models.requests import GenerateRequest

    items = ref.load_items(limit=2 * n_prompts)
    greedy = [GenerateRequest(p, max_new_tokens=int(ref.options["max_new_tokens"]), temperature=0.0, chat=True,
                              system=ref.options["system"]) for p in items["prompt"]]
    return {"sampled": sampled, "greedy": greedy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=6, help="prompts per system prompt / per set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="ours,ours-1t,hf,hf-1t")
    parser.add_argument("--workloads", default="sampled,greedy")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/generate.json"))
    args = parser.parse_args()

    import torch

    from alignscope.models import Engine, load

    lm = load(args.model, dtype=args.dtype)
    variants = [v.strip() for v in args.variants.split(",")]
    loads = {k: v for k, v in workloads(args.prompts).items() if k in args.workloads.split(",")}
    times: dict[str, dict[str, list[dict[str, float]]]] = {w: {v: [] for v in variants} for w in loads}
    outputs: dict[str, dict[str, list]] = {w: {} for w in loads}
    for repeat in range(args.repeats):
        for work, requests in loads.items():
            for variant in variants:
                engine = Engine(lm, cache=None, progress=False, **VARIANTS[variant])
                wall, cpu, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
                results = engine.generate(requests)
                row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                       "load": load_before}
                times[work][variant].append(row)
                outputs[work][variant] = [r.texts for r in results]
                print(f"repeat {repeat} {work:8s} {variant:8s} wall {row['wall_s']:7.1f}s cpu {row['cpu_s']:7.1f}s "
                      f"load {load_before:.1f}", flush=True)
    summary = {}
    for work, by_variant in times.items():
        requests = loads[work]
        summary[work] = {
            "requests": len(requests), "samples": sum(r.num_samples for r in requests),
            "max_new_tokens": requests[0].max_new_tokens,
            "median_wall_s": {v: statistics.median(t["wall_s"] for t in ts) for v, ts in by_variant.items()},
            "median_cpu_s": {v: statistics.median(t["cpu_s"] for t in ts) for v, ts in by_variant.items()},
        }
        if "ours" in by_variant and "hf" in by_variant:
            s = summary[work]
            s["speedup_wall_hf_over_ours"] = s["median_wall_s"]["hf"] / s["median_wall_s"]["ours"]
            s["speedup_cpu_hf_over_ours"] = s["median_cpu_s"]["hf"] / s["median_cpu_s"]["ours"]
        if work == "greedy" and "ours" in outputs[work] and "hf" in outputs[work]:
            summary[work]["greedy_identical_to_hf"] = outputs[work]["ours"] == outputs[work]["hf"]
        print(work, json.dumps(summary[work], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "generate", "model": args.model, "dtype": str(lm.dtype),
                                    "prompts": args.prompts, "repeats": args.repeats, "summary": summary,
                                    "runs": times, "torch_threads": torch.get_num_threads(),
                                    "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
