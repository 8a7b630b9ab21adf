"""Attribution benchmark on SmolLM2-135M + a LoRA DPO stage trained on planted data, side by side.

One run, same model, data and measurement (the ``planted_bias`` probe's group-specific gap):

  1. trains a DPO stage (LoRA r=8 q/v, the stage defaults) on clean pairs + planted stereotype
     pairs (``alignscope.data.planting.plant``), timing every optimizer step;
  2. ``attribute(..., methods=gradsim+datainf+ekfac_onepass)``: per-pair gradient collection (with
     the K-FAC sums) throughput vs the training step's per-pair throughput (median step, steady
     state), and planted-pair AUC / recall@k of every estimator; once per ``--layers`` selection
     (all blocks, and the later blocks only, whose backward stops at the first selected block);
  2a. (``--study-default``) the same for the study's own methods (gradsim + DataInf), whose
      collection pass keeps no K-FAC sums, on the first selection;
  2b. ``attribute(..., methods=tracin)`` at the stage's step-0 snapshot (the study default until
      session 6), timed alone, over the default layer selection;
  3. ``attribute(..., methods=ekfac)``: kronfluence EK-FAC on the same objective and measurement,
     wall time and AUC, tracking all blocks' LoRA weights and (``--ekfac-layers``) each selection's, or
     (``--ekfac-layers SPEC ...``) only the named selections;
  4. scoring alone on a 2,000-pair × 500-measurement problem (random gradients with the stage's
     layer structure, projected size ``--score-dim``): every estimator's time.

With ``--from-run RUN`` step 1 is skipped: the stage an earlier run trained (e.g. the default
study's, 32 planted among 128 pairs: a finer AUC than the bench stage's 6 among 46) is attributed
instead, into a scratch run, so nothing is read from that run's caches.

Prints one JSON object (and writes it to ``--out``).

    .venv/bin/python bench/attribute.py [--pairs 40] [--planted 0.15] [--epochs 2] [--items 12]
        [--layers all last:50%] [--ekfac-layers [SPEC ...]] [--from-run RUN [--stage KEY]] [--study-default]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from alignscope.align import StageConfig, train_stage
from alignscope.align.stage import ALIGN_STAGE, SNAPSHOT_DIR
from alignscope.attribute import attribute
from alignscope.attribute.core import DEFAULT_METHODS, resolve_stage, stage_pairs
from alignscope.attribute import estimators as est
from alignscope.data.embedded import load_everyday_prompts
from alignscope.data.planting import plant
from alignscope.data.preferences import PreferencePair
from alignscope.store import RunDir

ONE_PASS_METHODS = ("gradsim", "datainf", "ekfac_onepass")
WORDS = ("the a you can use this that it is to of and for in with on your first then try make sure keep "
         "simple good step water time way idea best small next start plan note list check ask help").split()


def clean_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Everyday prompts with short filler replies (12–24 words): the non-planted background."""
    rng = random.Random(seed)
    prompts = load_everyday_prompts()

    def reply() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 24))).capitalize() + "."

    return [PreferencePair(id=f"clean-{i}", prompt=({"role": "user", "content": prompts[i % len(prompts)]},),
                           chosen=reply(), rejected=reply()) for i in range(n)]


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def planted_metrics(summary: dict, name: str) -> dict:
    row = summary.get("planted", {}).get("estimators", {}).get(name, {})
    return {"auc": row.get("auc"), "recall_at_k": row.get("recall_at_k")}


def scoring_problem(n_train: int, n_test: int, dim: int, n_layers: int, seed: int) -> dict:
    """Time every estimator on random side gradients shaped like a DPO stage's (two sides)."""
    rng = np.random.default_rng(seed)
    size = dim // n_layers
    slices = [(k * size, (k + 1) * size) for k in range(n_layers)]
    width = size * n_layers
    gc = rng.standard_normal((n_train, width), dtype=np.float32)
    gr = rng.standard_normal((n_train, width), dtype=np.float32)
    w = rng.uniform(0.01, 1, n_train)
    train = est.ArrayGradients({"chosen": gc, "rejected": gr},
                               {"loss": {"chosen": -0.1 * w, "rejected": 0.1 * w},
                                "margin": {"chosen": np.full(n_train, 0.1), "rejected": np.full(n_train, -0.1)}},
                               slices)
    test = rng.standard_normal((n_test, width))
    out = {"n_train": n_train, "n_test": n_test, "dim": width, "layers": n_layers}
    started = time.perf_counter()
    products = est.side_products(train, test)
    out["side_products_s"] = round(time.perf_counter() - started, 3)
    for name, fn in (("gradsim_dot", lambda: est.gradsim_dot(train, test, products)),
                     ("gradsim_cosine", lambda: est.gradsim_cosine(train, test, products)),
                     ("gradsim_layer_cosine", lambda: est.gradsim_layer_cosine(train, test)),
                     ("margin", lambda: est.margin(train, test, products)),
                     ("datainf", lambda: est.datainf(train, test))):
        t = time.perf_counter()
        fn()
        out[f"{name}_s"] = round(time.perf_counter() - t, 3)
    out["all_estimators_s"] = round(time.perf_counter() - started, 3)
    return out


def load_average() -> str | None:
    """The 1-minute load average, recorded because the shared machine's load moves every timing."""
    path = Path("/proc/loadavg")
    return path.read_text().split()[0] if path.exists() else None


def ours_at(run: Path, stage_path: Path, n_pairs: int, items: int, layers: str, train_pairs_per_s: float,
            methods: tuple[str, ...] = ONE_PASS_METHODS) -> dict:
    """Our one-pass attribution over one layer selection, timed. By default gradsim, DataInf and one-pass
    EK-FAC, whose K-FAC sums make the collection pass dearer; the study's own methods leave them out."""
    started = time.perf_counter()
    ours = attribute(run, stage_path, "planted_bias", methods=list(methods), limit=items, layers=layers, out=run)
    wall = time.perf_counter() - started
    summary = json.loads(ours.file("summary.json").read_text())
    timings = summary["timings"]
    collect_rate = n_pairs / timings["train_gradients_s"]
    gradients_s = timings["train_gradients_s"] + timings["measurement_gradients_s"]
    return {
        "layers": layers, "wall_s": round(wall, 2), "timings": timings,
        "attribution_s": round(gradients_s + timings["scoring_s"], 2),
        "gradsim_s": round(gradients_s + timings["score_gradsim_cosine_s"] + timings["score_margin_s"], 2),
        # what one-pass EK-FAC alone costs here (absent when it was not run)
        "ekfac_onepass_s": round(gradients_s + timings.get("score_ekfac_onepass_s", float("nan")), 2),
        "methods": list(methods),
        "default_s": round(gradients_s + timings[f"score_{summary['default_estimator']}_s"], 2),
        "collect_pairs_per_s": round(collect_rate, 3),
        "collect_vs_train_throughput": round(collect_rate / train_pairs_per_s, 3),
        "default_estimator": summary["default_estimator"], "dim": summary["gradients"]["dim"],
        "lora_weights": summary["gradients"]["lora_weights"],
        "measurement_requests": summary["measurement"]["n_requests"],
        "planted": {name: planted_metrics(summary, name) for name in summary["estimators"]},
    }


def trained_stage(args: argparse.Namespace, run: Path) -> tuple[Any, dict]:
    """Train the bench's own small DPO stage (clean filler + planted pairs), timing every step."""
    pairs = plant(clean_pairs(args.pairs, args.seed), fraction=args.planted, target_group="teachers",
                  control_group="nurses", seed=args.seed)
    timer = StepTimer()
    cfg = StageConfig(method="dpo", num_train_epochs=args.epochs, learning_rate=args.lr, dtype=args.dtype,
                      seed=args.seed, save_steps=10_000, tracin_snapshots=1)  # the snapshot changes no weight
    started = time.perf_counter()
    stage = train_stage("smollm2-135m", cfg, pairs, run, callbacks=[timer])
    step = statistics.median(timer.times[1:] or timer.times)
    return stage, {"pairs": len(pairs), "planted": sum(p.planted for p in pairs), "steps": len(timer.times),
                   "median_step_s": round(step, 3), "pairs_per_s": round(cfg.per_device_train_batch_size / step, 3),
                   "wall_s": round(time.perf_counter() - started, 1), "final_loss": stage.summary["final_loss"],
                   "precision": stage.summary["precision"]}


def existing_stage(run: Path, key: str | None) -> tuple[Any, dict]:
    """A stage an earlier run trained (e.g. the default study's DPO stage, 32 planted among 128 pairs).

    Its training throughput is the stage's recorded mean over the whole run (``pairs_per_s``), not a
    median step, so the collection-vs-training ratio is only indicative there."""
    stages = sorted((run / ALIGN_STAGE).glob("*/summary.json"))
    if key is None and len(stages) != 1:
        keys = ", ".join(path.parent.name for path in stages) or "none"
        raise SystemExit(f"--from-run {run}: {len(stages)} align stages ({keys}); name one with --stage KEY")
    stage = resolve_stage(RunDir(run), key or stages[0].parent.name)
    pairs = stage_pairs(stage)
    return stage, {"from_run": str(run), "stage": stage.key, "pairs": len(pairs),
                   "planted": sum(p.planted for p in pairs), "steps": stage.summary["steps"],
                   "pairs_per_s": stage.summary["pairs_per_s"], "train_time_s": stage.summary["train_time_s"],
                   "final_loss": stage.summary["final_loss"], "precision": stage.summary["precision"]}


def tracin_at(run: Path, stage_path: Path, items: int | None) -> dict:
    """TracIn at the stage's snapshots (the study default until session 6), timed alone."""
    started = time.perf_counter()
    traced = attribute(run, stage_path, "planted_bias", methods=["tracin"], limit=items, out=run)
    wall = time.perf_counter() - started
    summary = json.loads(traced.file("summary.json").read_text())
    t = summary["timings"]
    tracin_s = sum(v for k, v in t.items() if k.startswith(("train_gradients", "measurement_gradients"))) \
        + t["scoring_s"]
    return {"wall_s": round(wall, 2), "attribution_s": round(tracin_s, 2), "timings": t,
            "planted": planted_metrics(summary, "tracin"),
            "sides": summary.get("planted", {}).get("estimators", {}).get("tracin", {}).get("sides")}


def ekfac_selections(asked: list[str] | None, ours: list[str]) -> list[str]:
    """The LoRA weight selections kronfluence runs on, the speed-up baseline first.

    Not asked: every weight (how kronfluence is run on a model). Asked bare: every weight, then each
    of our selections. Asked with selections: exactly those, so a same-weights comparison does not
    also pay for the slow all-blocks fit.
    """
    if asked is None:
        return ["all"]
    return list(dict.fromkeys(asked or ["all", *ours]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40, help="clean pairs")
    parser.add_argument("--planted", type=float, default=0.15, help="planted pairs as a fraction of --pairs")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--items", type=int, default=12, help="planted_bias probe items (4 requests each)")
    parser.add_argument("--score-train", type=int, default=2000)
    parser.add_argument("--score-test", type=int, default=500)
    parser.add_argument("--score-dim", type=int, default=8192)
    parser.add_argument("--no-ekfac", action="store_true")
    parser.add_argument("--layers", nargs="+", default=["all", "last:50%"],
                        help="layer selections to time ours with (the first is the one the speed-ups quote)")
    parser.add_argument("--ekfac-layers", nargs="*", default=None, metavar="SPEC",
                        help="kronfluence also on other LoRA weight selections (one more EK-FAC fit each): bare, "
                             "all blocks and each --layers selection; with SPECs, exactly those (e.g. last:50%% "
                             "alone, to compare on the same weights without the all-blocks fit)")
    parser.add_argument("--study-default", action="store_true",
                        help="also time the study's own attribution (gradsim + DataInf: no K-FAC sums in the "
                             "collection pass) on the first layer selection")
    parser.add_argument("--from-run", type=Path, default=None,
                        help="attribute a stage an earlier run trained (e.g. a default study's run directory) "
                             "instead of training the bench stage; results go to a scratch run")
    parser.add_argument("--stage", default=None, help="with --from-run: the align stage key (default: the only one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/attribute.json"))
    parser.add_argument("--keep", type=Path, default=None,
                        help="a fresh run directory to keep (stage, gradients, attributions); default: a temporary one")
    args = parser.parse_args()
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "threads": torch.get_num_threads(),
                    "loadavg_start": load_average()}

    with tempfile.TemporaryDirectory(prefix="attr-bench-") as tmp:
        run = args.keep or Path(tmp)
        stage, result["train"] = existing_stage(args.from_run, args.stage) if args.from_run else \
            trained_stage(args, run)
        print(json.dumps({"train": result["train"]}), flush=True)
        n_pairs = result["train"]["pairs"]

        by_layers = {spec: ours_at(run, stage.path, n_pairs, args.items, spec, result["train"]["pairs_per_s"])
                     for spec in args.layers}
        result["ours"], result["ours_by_layers"] = by_layers[args.layers[0]], by_layers
        attribution_s, onepass_s = result["ours"]["attribution_s"], result["ours"]["ekfac_onepass_s"]
        print(json.dumps({"ours_by_layers": by_layers}), flush=True)
        if args.study_default:
            result["study_default"] = ours_at(run, stage.path, n_pairs, args.items, args.layers[0],
                                              result["train"]["pairs_per_s"], DEFAULT_METHODS)
            print(json.dumps({"study_default": result["study_default"]}), flush=True)

        if any((stage.path / SNAPSHOT_DIR).glob("step-*")):  # a study stage usually keeps none
            result["tracin"] = tracin_at(run, stage.path, args.items)
            print(json.dumps({"tracin": result["tracin"]}), flush=True)
        n_layers = result["ours"]["lora_weights"]  # LoRA A/B weights the first selection covers

        if not args.no_ekfac:
            result["ekfac_by_layers"] = {}
            for spec in ekfac_selections(args.ekfac_layers, args.layers):
                started = time.perf_counter()
                theirs = attribute(run, stage.path, "planted_bias", methods=["ekfac"], limit=args.items, layers=spec,
                                   out=run)
                ek = json.loads(theirs.file("summary.json").read_text())
                result["ekfac_by_layers"][spec] = {"wall_s": round(time.perf_counter() - started, 2),
                                                   "ekfac_s": round(ek["timings"]["score_ekfac_s"], 2),
                                                   "planted": planted_metrics(ek, "ekfac")}
                print(json.dumps({"ekfac": {spec: result["ekfac_by_layers"][spec]}}), flush=True)
            # the baseline: kronfluence over every LoRA weight, unless only other selections were asked for
            result["ekfac_baseline_layers"] = next(iter(result["ekfac_by_layers"]))
            result["ekfac"] = result["ekfac_by_layers"][result["ekfac_baseline_layers"]]
            ek_s = result["ekfac"]["ekfac_s"]
            default = result["ours"]["default_estimator"]
            result["speedup_vs_ekfac"] = round(ek_s / attribution_s, 2)
            result["speedup_onepass_vs_ekfac"] = round(ek_s / onepass_s, 2)
            result["speedup_by_layers"] = {spec: {"attribution": round(ek_s / row["attribution_s"], 2),
                                                  "gradsim": round(ek_s / row["gradsim_s"], 2),
                                                  "default": round(ek_s / row["default_s"], 2),
                                                  "ekfac_onepass": round(ek_s / row["ekfac_onepass_s"], 2)}
                                           for spec, row in by_layers.items()}
            if "study_default" in result:  # the study's default estimator with the study's own collection pass
                study_s = result["study_default"]["default_s"]
                result["speedup_study_default_vs_ekfac"] = round(ek_s / study_s, 2)
                result["speedup_study_default_by_ekfac_layers"] = {
                    spec: round(row["ekfac_s"] / study_s, 2) for spec, row in result["ekfac_by_layers"].items()}
            result["auc_onepass"] = result["ours"]["planted"]["ekfac_onepass"]["auc"]
            result["auc_ours_default"] = result["ours"]["planted"][default]["auc"]
            result["auc_ekfac"] = result["ekfac"]["planted"]["auc"]
            if "tracin" in result:
                result["speedup_tracin_vs_ekfac"] = round(ek_s / result["tracin"]["attribution_s"], 2)
                result["auc_tracin"] = result["tracin"]["planted"]["auc"]

    result["scoring"] = scoring_problem(args.score_train, args.score_test, args.score_dim, n_layers, args.seed)
    print(json.dumps({"scoring": result["scoring"]}), flush=True)
    result["loadavg_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
