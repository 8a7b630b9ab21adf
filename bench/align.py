"""DPO stage benchmark on SmolLM2-135M + LoRA r=8: cached reference vs TRL's per-step reference.

One run measures, on the same pairs, model, batch and seed, through ``train_stage`` (the code the
``align`` command runs):

  (cached)  the reference log-probs come from the run's reference cache (computed once, stored as
            Parquet; TRL reads them via ``precompute_ref_log_probs``), so a step is policy only;
  (trl)     TRL computes the reference every step (adapter disabled, one extra no-grad forward);

each once with TRL's fused LM head projecting only labelled positions (ours,
``recipes.completion_positions_only``) and once as TRL ships it on CPU (``*_stock_head``: every
position projected). "TRL as shipped" = per-step reference + stock head.

Pairs/s is steady state: the median step time after ``--warmup`` steps (wall clock, and process
CPU time, which a busy shared machine distorts less). The measured runs see only the
``steps × batch`` pairs they train on. The default-stage estimate for ``--pairs`` pairs (1 epoch)
adds what a real stage pays once: setup (load, fingerprint, tokenisation) and the reference pass,
whose per-pair cost is measured on the run's pairs and scaled to ``--pairs``.

Workload: prompts from the embedded everyday requests; replies shaped like the embedded default
(synthesised, ``max_new_tokens=48``): 24–48-token chosen and rejected texts. ``--data FILE``
uses real pairs instead.

    .venv/bin/python bench/align.py [--pairs 200] [--steps 6] [--warmup 1] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import alignscope.align.stage as stage_module
from alignscope.align import StageConfig, train_stage
from alignscope.data.embedded import load_everyday_prompts
from alignscope.data.preferences import PreferencePair, load_preferences

WORDS = ("the a you can use this that it is to of and for in with on your first then try make sure keep "
         "simple good step water time way idea best small next start plan note list check ask help").split()


def workload(n: int, seed: int, tokenizer) -> list[PreferencePair]:
    rng = random.Random(seed)
    prompts = load_everyday_prompts()
    pairs = []
    for i in range(n):
        def reply(lo: int, hi: int) -> str:
            target = rng.randint(lo, hi)
            words: list[str] = []
            while len(tokenizer(" ".join(words))["input_ids"]) < target:
                words.append(rng.choice(WORDS))
            return " ".join(words).capitalize() + "."
        chosen, rejected = reply(24, 48), reply(24, 48)
        if chosen == rejected:
            rejected += " No."
        pairs.append(PreferencePair(id=f"bench-{i}", prompt=({"role": "user", "content": prompts[i % len(prompts)]},),
                                    chosen=chosen, rejected=rejected))
    return pairs


class StepTimer(TrainerCallback):
    """Wall and process-CPU seconds of every optimizer step (CPU time is less sensitive to other
    load on a shared machine; both are reported)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


def run_variant(name: str, pairs, cfg: StageConfig, out: Path, warmup: int) -> dict:
    timer = StepTimer()
    started = time.perf_counter()
    result = train_stage("smollm2-135m", cfg, pairs, out, callbacks=[timer])
    wall = time.perf_counter() - started
    step = statistics.median(timer.times[warmup:] or timer.times)
    cpu_step = statistics.median(timer.cpu[warmup:] or timer.cpu)
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    s = result.summary
    out_row = {
        "variant": name, "step_times_s": [round(t, 3) for t in timer.times], "median_step_s": round(step, 3),
        "step_cpu_s": [round(t, 3) for t in timer.cpu], "median_step_cpu_s": round(cpu_step, 3),
        "pairs_per_s": round(batch / step, 4), "pairs_per_cpu_s": round(batch / cpu_step, 4),
        "setup_s": s["setup_time_s"], "train_s": s["train_time_s"],
        "wall_s": round(wall, 2), "reference_compute_s": (s["reference"] or {}).get("compute_time_s"),
        "final_loss": s["final_loss"], "precision": s["precision"], "n_truncated": s["n_truncated"],
    }
    print(json.dumps(out_row), flush=True)
    return out_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200, help="pairs in the default-stage estimate")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps measured per variant")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (the stage default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--data", type=Path, default=None, help="real pairs instead of the shaped workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/align.json"))
    args = parser.parse_args()
    load_at_start = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"

    from alignscope.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load("smollm2-135m", dtype="float32", device="cpu").tokenizer
    if args.data is not None:
        pairs = load_preferences(args.data)[: args.pairs]
    else:
        pairs = workload(args.pairs, args.seed, tokenizer)
    lengths = [len(tokenizer.apply_chat_template(p.conversation("chosen"), tokenize=True, return_dict=True)["input_ids"])
               for p in pairs]
    n_run = min(len(pairs), args.steps * args.batch)  # the pairs the measured steps see
    run_pairs = pairs[:n_run]
    print(f"{len(pairs)} pairs (measured runs use {n_run}); prompt+chosen tokens median "
          f"{statistics.median(lengths)} max {max(lengths)}; {torch.get_num_threads()} threads", flush=True)

    base = dict(method="dpo", max_steps=args.steps, per_device_train_batch_size=args.batch, dtype=args.dtype,
                seed=args.seed, save_steps=10_000)
    variants = {}
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        for compact in (True, False):  # False: TRL's fused head as shipped (every position projected on CPU)
            stage_module.COMPACT_FUSED_HEAD = compact
            head = "" if compact else "_stock_head"
            for name, precompute in (("cached_reference", True), ("trl_reference_each_step", False)):
                variants[name + head] = run_variant(name + head, run_pairs,
                                                    StageConfig(**base, precompute_ref_log_probs=precompute),
                                                    Path(tmp) / (name + head), args.warmup)
        stage_module.COMPACT_FUSED_HEAD = True
    cached, trl = variants["cached_reference"], variants["trl_reference_each_step"]
    stock = variants["trl_reference_each_step_stock_head"]

    def ratio(slow: dict, fast: dict, key: str = "median_step_s") -> float:
        return round(slow[key] / fast[key], 3)

    steps_per_epoch = -(-len(pairs) // args.batch)
    ref_per_pair = cached["reference_compute_s"] / n_run
    setup_other = cached["setup_s"] - cached["reference_compute_s"]
    estimate = setup_other + ref_per_pair * len(pairs) + cached["median_step_s"] * steps_per_epoch
    stock_cached = variants["cached_reference_stock_head"]
    stock_estimate = (stock_cached["setup_s"] - stock_cached["reference_compute_s"]
                      + stock_cached["reference_compute_s"] / n_run * len(pairs)
                      + stock["median_step_s"] * steps_per_epoch)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"load average at start {load_at_start}",
        "model": "smollm2-135m", "lora_r": 8, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "pairs_measured": n_run, "variants": list(variants.values()),
        "speedup_cached_vs_trl_wall": ratio(trl, cached),
        "speedup_cached_vs_trl_cpu": ratio(trl, cached, "median_step_cpu_s"),
        "speedup_cached_vs_trl_stock_head_wall": ratio(stock, stock_cached),
        "speedup_ours_vs_trl_as_shipped_wall": ratio(stock, cached),
        "speedup_ours_vs_trl_as_shipped_cpu": ratio(stock, cached, "median_step_cpu_s"),
        "reference_pass_s_per_pair": round(ref_per_pair, 3),
        "default_stage_pairs": len(pairs),
        "default_stage_estimate_s": round(estimate, 1),
        "default_stage_estimate_note": f"setup without reference ({setup_other:.1f}s) + reference pass "
                                       f"{len(pairs)} × {ref_per_pair:.2f}s + {steps_per_epoch} steps × "
                                       f"{cached['median_step_s']:.2f}s (cached, wall)",
        "default_stage_estimate_trl_as_shipped_s": round(stock_estimate, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"pairs/s cached {cached['pairs_per_s']:.3f} vs TRL per-step reference {trl['pairs_per_s']:.3f}: "
          f"{result['speedup_cached_vs_trl_wall']:.2f}x wall, {result['speedup_cached_vs_trl_cpu']:.2f}x CPU time; "
          f"vs TRL as shipped (per-step reference, every position through the head) "
          f"{result['speedup_ours_vs_trl_as_shipped_wall']:.2f}x wall; default DPO stage ({len(pairs)} pairs, "
          f"1 epoch) ≈ {estimate / 60:.1f} min (TRL as shipped ≈ {stock_estimate / 60:.1f} min)")


if __name__ == "__main__":
    main()
