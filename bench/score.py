"""Engine benchmark: matched-guise-shaped scoring and plain batched scoring FLOP efficiency.

Compares, in one run on one machine, throughput (requests/s) of
  (ours) the engine with shared-context packing,
  (a)    one request at a time (full forward + full log-softmax, the research-script way),
  (b)    the engine's length-sorted batching with context sharing switched off,
and reports medians of --repeats runs. Baselines run on a subsample of the same workload (each
request is independent there, so requests/s does not depend on the sample size).

    .venv/bin/python bench/score.py [--texts 50] [--repeats 3] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from alignscope.data.guise import load_adjectives, load_dialect_pairs, load_templates
from alignscope.models import Engine, ScoreRequest, load
from alignscope.models.reference import reference_logprobs


def guise_workload(n_texts: int) -> list[ScoreRequest]:
    pairs = load_dialect_pairs()
    texts = [t for p in pairs[: (n_texts + 1) // 2] for t in (p.aae, p.sae)][:n_texts]
    templates = load_templates()["trait"]
    adjectives = load_adjectives()["adjective"].tolist()
    return [ScoreRequest(tpl.format(text), " " + adj) for text in texts for tpl in templates for adj in adjectives]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, repeats))
    return 2 * size**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--baseline-texts", type=int, default=2, help="texts in the baselines' subsample")
    parser.add_argument("--out", type=Path, default=Path("bench/results/score.json"))
    args = parser.parse_args()

    lm = load("smollm2-135m", dtype=args.dtype)
    n_params = sum(p.numel() for p in lm.model.parameters())
    workload = guise_workload(args.texts)
    sample = guise_workload(args.baseline_texts)
    single_sample = sample[: len(sample) // 2]  # (a) is slow; half a text's worth is plenty
    print(f"model dtype {lm.dtype}, {len(workload)} requests; baselines on {len(sample)}/{len(single_sample)}")

    ours = Engine(lm, cache=None, progress=False)
    unshared = Engine(lm, cache=None, progress=False, share_context=False)
    t_ours = timed(lambda: ours.score(workload), args.repeats)
    t_b = timed(lambda: unshared.score(sample), args.repeats)
    t_a = timed(lambda: reference_logprobs(lm, single_sample), args.repeats)
    rps = {"ours": len(workload) / statistics.median(t_ours), "b_no_sharing": len(sample) / statistics.median(t_b),
           "a_one_at_a_time": len(single_sample) / statistics.median(t_a)}

    # Plain batched scoring of 128-token sequences: useful FLOPs = 2 × params × tokens.
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (64, 128)).tolist()
    text_requests = [ScoreRequest("", lm.tokenizer.decode(row)) for row in ids]
    tokens = sum(len(r.token_ids) + 1 for r in unshared.score(text_requests))
    t_plain = timed(lambda: unshared.score(text_requests), args.repeats)
    plain_gflops = 2 * n_params * tokens / statistics.median(t_plain) / 1e9
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16, size=512, repeats=1)}
    peak = peaks["bfloat16" if lm.dtype == torch.bfloat16 else "float32"]

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "dtype": str(lm.dtype), "requests": len(workload), "texts": args.texts, "repeats": args.repeats,
        "seconds_ours": t_ours, "seconds_b": t_b, "seconds_a": t_a, "requests_per_s": rps,
        "speedup_vs_a": rps["ours"] / rps["a_one_at_a_time"], "speedup_vs_b": rps["ours"] / rps["b_no_sharing"],
        "plain_128_tokens_gflops": plain_gflops, "matmul_peak_gflops": peaks,
        "plain_fraction_of_peak": plain_gflops / peak,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
