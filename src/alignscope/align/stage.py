"""Run a training stage into a run directory: cached, resumable, logged, guarded.

Layout (``RUN`` is ``--out``)::

    RUN/align/<key>/            a finished stage (key = hash of start-model fingerprint, data
        adapter/                fingerprint, resolved stage config, seed, process count)
        model/                  (full fine-tuning only: the trained weights)
        pairs.parquet           the training pairs (read back with load_preferences)
        logs.jsonl              one JSON object per logged step (TRL's metric names + step, epoch)
        snapshots/step-<k>/     (tracin_snapshots > 0) the adapter before step k + snapshot.json (lr)
        summary.json            method, steps, final loss, times, pairs/s, truncation, config, ids
        inputs.json             what the key was computed from
    RUN/reference/<key>/ref_logps.parquet   reference log-prob cache (DPO/IPO; see reference.py)
    RUN/merged/<key>/model/     a stage's adapter merged into its start model (multi-stage)
    RUN/.work/align/<key>/      checkpoints while training; an interrupted stage resumes from here

Multi-stage semantics — **merged**: stage ``k+1`` starts from stage ``k``'s LoRA merged into the
base weights (saved as a plain fp32 checkpoint), gets a *fresh* LoRA on top, and (for DPO-style
methods) uses that merged model as its reference. "SFT then DPO" therefore means DPO anchored at
the SFT model, as in the usual pipeline. An ``init_adapter`` is merged the same way first.
The policy after a stage is its start model plus ``adapter/`` (or ``model/`` for full
fine-tuning): ``StageResult.from_dir(RUN/align/<key>).load()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignscope.align.config import METHODS, StageConfig, load_stage_config, parse_stages
from alignscope.errors import InputError
from alignscope.store import RunDir, atomic_write_json, atomic_write_text, content_hash, file_hash, versions

ALIGN_STAGE = "align"
MERGED_STAGE = "merged"
LOG_FILE = "logs.jsonl"
SNAPSHOT_DIR = "snapshots"  # TracIn: adapters before chosen steps (see SnapshotCallback)
PAIRS_FILE = "pairs.parquet"  # the training pairs, as written by write_preferences
# TRL's fused LM head scores only labelled positions on CPU too (recipes.completion_positions_only);
# False restores TRL's own behaviour (bench/align.py measures both; results are the same).
COMPACT_FUSED_HEAD = True


class StageFailed(InputError):
    """Training stopped (non-finite loss); the message names the step and the last good checkpoint."""


@dataclass
class StageResult:
    """A finished stage: where it lives and how to load the trained policy."""

    path: Path
    key: str
    method: str
    start_model: str
    adapter: Path | None
    model_dir: Path | None
    summary: dict[str, Any] = field(repr=False)
    cached: bool = False

    def load(self, dtype: str = "auto", device: str = "auto") -> Any:
        """The policy after this stage as a ``LoadedModel``."""
        from alignscope.models import load

        if self.model_dir is not None:
            return load(str(self.model_dir), dtype=dtype, device=device)
        return load(self.start_model, adapter=self.adapter, dtype=dtype, device=device)

    def load_snapshot(self, snapshot: Path, dtype: str = "auto", device: str = "auto") -> Any:
        """The policy as it was at a TracIn snapshot (``snapshots/step-<k>``) of this LoRA stage."""
        from alignscope.models import load

        return load(self.start_model, adapter=snapshot, dtype=dtype, device=device)

    @classmethod
    def from_dir(cls, path: Path, cached: bool = True) -> StageResult:
        summary = json.loads((path / "summary.json").read_text())
        start = summary["start_model"]
        if summary.get("start_model_in_run"):  # a merged checkpoint of this run: survive moving the run dir
            start = str(path.parents[1] / summary["start_model_in_run"])
        return cls(path=path, key=path.name, method=summary["method"], start_model=start,
                   adapter=path / "adapter" if (path / "adapter").is_dir() else None,
                   model_dir=path / "model" if (path / "model").is_dir() else None,
                   summary=summary, cached=cached)


# --------------------------------------------------------------------------- helpers


def _distributed() -> Any:
    """The accelerate PartialState under ``accelerate launch`` with several processes, else None."""
    from alignscope.models.engine import _distributed_state

    return _distributed_state()


def _is_main() -> bool:
    state = _distributed()
    return state is None or bool(state.is_main_process)


def _barrier() -> None:
    state = _distributed()
    if state is not None:
        state.wait_for_everyone()


def _processes() -> int:
    state = _distributed()
    return 1 if state is None else int(state.num_processes)


def _use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def _relative_to(spec: str, root: Path) -> str | None:
    """``spec`` relative to the run directory when it points inside it (e.g. a merged checkpoint)."""
    if not Path(spec).exists():
        return None
    try:
        return str(Path(spec).resolve().relative_to(root.resolve()))
    except (ValueError, OSError):
        return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _finite(value.item())
    return value


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write (a reader never sees half a line)."""
    line = (json.dumps(record, ensure_ascii=False, allow_nan=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_complete_checkpoint(work: Path) -> str | None:
    """The newest checkpoint that the Trainer finished writing, or None.

    Why: a kill during a save leaves ``checkpoint-N`` without ``trainer_state.json`` (the Trainer writes
    it last), and resuming from that half-written directory fails. Such directories are removed (by
    the main process) so checkpoint rotation never counts them either.
    """
    complete: list[tuple[int, Path]] = []
    for path in work.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if _is_main():
                shutil.rmtree(path, ignore_errors=True)
            continue
        complete.append((int(step), path))
    return str(max(complete)[1]) if complete else None


def _is_final_checkpoint(checkpoint: str) -> bool:
    """Whether a checkpoint was saved after the last planned step (killed before the stage was written).

    Resuming from such a checkpoint, transformers 5.x trains one step *more* than ``max_steps``
    (measured: 7 of 6; ``tests/test_interruption.py``), so it is loaded instead of resumed.
    """
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("max_steps") or 0) > 0 and int(state.get("global_step") or 0) >= int(state["max_steps"])


def _load_final_checkpoint(trainer: Any, checkpoint: str) -> None:
    """Put a finished checkpoint's weights and state into ``trainer`` without training."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loader: adapter or full weights
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines after ``last_step`` (before resuming from that checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
    atomic_write_text(path, "".join(f"{x}\n" for x in keep))


def _log_callback_class() -> Any:
    from transformers import TrainerCallback

    class JsonlLogCallback(TrainerCallback):
        """Every TRL log record as one JSON line (TRL's metric names, plus step/epoch/time)."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, "epoch": _finite(state.epoch), "time": round(time.time(), 3)}
            record.update({k: _finite(v) for k, v in logs.items()})
            _append_line(self.path, record)

    return JsonlLogCallback


def snapshot_steps(total_steps: int, count: int) -> list[int]:
    """Steps (optimizer updates done) at which TracIn snapshots are taken: evenly spaced from 0."""
    if count <= 0 or total_steps <= 0:
        return []
    return sorted({(j * total_steps) // count for j in range(count)})


def _snapshot_callback_class() -> Any:
    from transformers import TrainerCallback

    class SnapshotCallback(TrainerCallback):
        """Saves the adapter (and the learning rate about to be used) before chosen steps, for TracIn.

        Why before the step: TracIn credits step k's update ``-η_k ∇L_i(θ_k)`` to pair i, so it needs
        θ_k and η_k as they are when step k starts. Written atomically; a resumed run keeps earlier ones.
        """

        def __init__(self, work: Path, count: int) -> None:
            self.work, self.count = work, count

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                          lr_scheduler: Any = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or state.global_step not in snapshot_steps(state.max_steps,
                                                                                          self.count):
                return
            target = self.work / SNAPSHOT_DIR / f"step-{state.global_step}"
            if target.exists():
                return
            scratch = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(scratch, ignore_errors=True)
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(scratch)
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
            atomic_write_json(scratch / "snapshot.json", {"step": state.global_step, "learning_rate": float(lr)})
            scratch.rename(target)

    return SnapshotCallback


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> int:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return len(out["input_ids"])


def count_truncation(tokenizer: Any, pairs: Sequence[Any], method: str, max_length: int | None) -> dict[str, int]:
    """How many pairs TRL will truncate (a reply cut short) or drop (the prompt alone is too long).

    Counted with the chat template, i.e. the tokenisation TRL's conversational path applies.
    RLOO never truncates prompts (completions are capped at generation instead).
    """
    if max_length is None or method == "rloo":
        return {"n_truncated": 0, "n_prompt_too_long": 0}
    truncated = too_long = 0
    for p in pairs:
        prompt = [dict(m) for m in p.prompt]
        n_prompt = _chat_ids(tokenizer, prompt, True)
        replies = [p.chosen] if method == "sft" else [p.chosen, p.rejected]
        n_full = max(_chat_ids(tokenizer, prompt + [{"role": "assistant", "content": r}], False) for r in replies)
        too_long += n_prompt >= max_length
        truncated += n_full > max_length
    return {"n_truncated": truncated, "n_prompt_too_long": too_long}


def resolve_precision(stage: StageConfig, device: Any) -> tuple[Any, bool]:
    """(weight dtype, bf16 autocast) for a stage on this hardware."""
    import torch

    from alignscope.models.loading import resolve_dtype

    hw_bf16 = resolve_dtype("auto", device) == torch.bfloat16
    if stage.dtype == "auto":
        weights = torch.bfloat16 if (stage.finetune == "lora" and hw_bf16) else torch.float32
    else:
        weights = resolve_dtype(stage.dtype, device)
    autocast = stage.bf16 if stage.bf16 is not None else (
        stage.finetune == "full" and stage.dtype == "auto" and hw_bf16)
    return weights, bool(autocast)


def _adapter_hash(path: Path) -> str:
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.startswith("adapter_"))
    if not files:
        raise InputError(f"adapter {path}: no adapter_config.json / adapter_model.* files")
    return content_hash({p.name: file_hash(p) for p in files})


def _dir_stamp(spec: str) -> str | None:
    """Cheap identity of a local checkpoint directory (file names, sizes, mtimes)."""
    from alignscope.models.loading import resolve_source

    source, is_local = resolve_source(spec)
    if not is_local:
        return None
    stat = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(source).iterdir()) if p.is_file()}
    return content_hash(stat)


def merge_adapter(start_model: str, adapter: str | Path, out: Path | str | RunDir,
                  key_inputs: dict[str, Any] | None = None) -> Path:
    """Merge a LoRA adapter into its base (in fp32) and store the plain checkpoint; cached.

    Returns the checkpoint directory (``RUN/merged/<key>/model``), loadable with ``load(path)``.
    """
    from alignscope.models import load

    run = out if isinstance(out, RunDir) else RunDir(out)
    adapter = Path(adapter)
    inputs = key_inputs or {"stage": MERGED_STAGE, "start": start_model, "start_files": _dir_stamp(start_model),
                            "adapter": _adapter_hash(adapter)}
    found = run.find(MERGED_STAGE, inputs)
    if found is None and _is_main():
        lm = load(start_model, adapter=adapter, dtype="float32", device="cpu")
        merged = lm.model.merge_and_unload()
        with run.build(MERGED_STAGE, inputs) as scratch:
            merged.save_pretrained(scratch / "model")
            lm.tokenizer.save_pretrained(scratch / "model")
    _barrier()
    return run.path(MERGED_STAGE, inputs) / "model"


def merged_checkpoint(result: StageResult, out: Path | str | RunDir) -> Path:
    """Plain weights after a stage: its ``model/`` (full fine-tuning) or its adapter merged in."""
    if result.model_dir is not None:
        return result.model_dir
    assert result.adapter is not None
    return merge_adapter(result.start_model, result.adapter, out,
                         {"stage": MERGED_STAGE, "align": result.key})


def _check_resources(start_spec: str, stage: StageConfig, weight_dtype: Any, run: RunDir) -> None:
    """Refuse a stage whose memory floor or checkpoint size clearly exceeds this machine (see guards)."""
    from alignscope.guards import check_training
    from alignscope.models.loading import resolve_source

    source, is_local = resolve_source(start_spec)
    check_training(start_spec, Path(source) if is_local else None, weight_dtype.itemsize,
                   stage.finetune == "full", run.root, stage.save_total_limit or 1)


# --------------------------------------------------------------------------- one stage


def train_stage(model: str | Path, stage: StageConfig, pairs: Sequence[Any], out: Path | str | RunDir, *,
                data_fingerprint: str | None = None, init_adapter: str | Path | None = None,
                callbacks: Sequence[Any] = ()) -> StageResult:
    """Train one stage on preference pairs, or return the finished identical stage (cache hit).

    Args:
        model: built-in name, checkpoint directory or hub id the stage starts from.
        stage: validated stage settings.
        pairs: ``PreferencePair`` records (see ``alignscope.data.preferences``).
        out: run directory.
        data_fingerprint: ``preferences_fingerprint(pairs)`` if already known.
        init_adapter: a LoRA adapter on ``model`` to start from; it is merged into the weights first.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Raises:
        StageFailed: the loss became NaN/inf; the last good checkpoint is kept for inspection.
    """
    import torch
    from transformers import set_seed

    from alignscope.align.recipes import (NonFiniteLoss, build_dataset, build_trainer, build_trl_args,
                                          completion_positions_only)
    from alignscope.align.reference import ReferenceStore, chat_template_hash, reference_inputs
    from alignscope.data.preferences import preferences_fingerprint, write_preferences
    from alignscope.models import load
    from alignscope.models.loading import resolve_device

    pairs = list(pairs)
    if not pairs:
        raise InputError(f"stage {stage.label}: no preference pairs to train on")
    ids = [str(p.id) for p in pairs]
    if len(set(ids)) != len(ids):
        raise InputError(f"stage {stage.label}: duplicate pair ids; ids must be unique")
    unknown = sorted(set(stage.zero_loss_pairs or ()) - set(ids))
    if unknown:
        raise InputError(f"stage {stage.label}: zero_loss_pairs names {len(unknown)} pair id(s) not in the data, "
                         f"e.g. {unknown[0]!r}; list ids of the stage's own pairs")
    run = out if isinstance(out, RunDir) else RunDir(out)
    started = time.perf_counter()

    use_cpu = _use_cpu()
    device = torch.device("cpu") if use_cpu else resolve_device("auto")
    weight_dtype, autocast_bf16 = resolve_precision(stage, device)
    start_spec = str(model)
    if init_adapter is not None:
        start_spec = str(merge_adapter(start_spec, init_adapter, run))
    _check_resources(start_spec, stage, weight_dtype, run)
    lm = load(start_spec, dtype=weight_dtype, device=device)
    if not getattr(lm.tokenizer, "chat_template", None):  # TRL would fail deep inside dataset mapping
        raise InputError(
            f"model {start_spec}: has no chat template, and every stage formats pairs as chat turns; "
            "start from a chat/instruct model or set tokenizer.chat_template and save it next to the weights")
    data_fp = data_fingerprint or preferences_fingerprint(pairs)
    processes = _processes()
    inputs = {"stage": ALIGN_STAGE, "method": stage.method, "start": lm.fingerprint, "data": data_fp,
              "config": stage.result_dict(), "seed": stage.seed, "processes": processes,
              "precision": {"weights": str(weight_dtype).removeprefix("torch."), "bf16_autocast": autocast_bf16}}
    found = run.find(ALIGN_STAGE, inputs)
    if found is not None:
        return StageResult.from_dir(found.path, cached=True)

    key = RunDir.key(inputs)
    work = run.root / ".work" / ALIGN_STAGE / key
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / LOG_FILE
    last = _last_complete_checkpoint(work)
    resumed_step = int(Path(last).name.split("-")[-1]) if last else 0
    if _is_main():
        if last:
            _truncate_log(log_path, resumed_step)
        elif log_path.exists():
            log_path.unlink()
    _barrier()

    store = None
    if stage.method in ("dpo", "ipo") and stage.precompute_ref_log_probs:
        store = ReferenceStore(run, reference_inputs(
            lm.fingerprint, data_fp, max_length=stage.max_length, truncation_mode=stage.truncation_mode,
            chat_template=chat_template_hash(lm.tokenizer), ld_alpha=stage.trl.get("ld_alpha"),
            mixed_precision="bf16" if autocast_bf16 else "no"))

    truncation = count_truncation(lm.tokenizer, pairs, stage.method, stage.max_length)
    set_seed(stage.seed)
    dataset = build_dataset(stage.method, pairs, stage.seed, stage.zero_loss_pairs)
    args = build_trl_args(stage, str(work), use_cpu=use_cpu, bf16=autocast_bf16)
    logger = _log_callback_class()(log_path)
    if stage.tracin_snapshots:
        callbacks = [*callbacks, _snapshot_callback_class()(work, stage.tracin_snapshots)]
    with completion_positions_only(COMPACT_FUSED_HEAD):
        trainer = build_trainer(stage, lm.model, lm.tokenizer, dataset, args,
                                callbacks=[logger, *callbacks], reference_store=store)
    setup_s = time.perf_counter() - started

    train_started = time.perf_counter()
    try:
        if last and _is_final_checkpoint(last):
            _load_final_checkpoint(trainer, last)
        else:
            with completion_positions_only(COMPACT_FUSED_HEAD):
                trainer.train(resume_from_checkpoint=last)
    except NonFiniteLoss as exc:
        good = _last_complete_checkpoint(work)
        if _is_main():
            atomic_write_json(work / "failed.json", {"step": exc.step, "loss": str(exc.value),
                                                     "last_good_checkpoint": good})
        where = f"last good checkpoint: {good}" if good else \
            f"no checkpoint was saved before it (save_steps={stage.save_steps})"
        raise StageFailed(
            f"stage {stage.label} ({stage.method}): the loss became {exc.value} at step {exc.step}; training "
            f"stopped before that update was applied ({where}; logs: {log_path}). Lower learning_rate (now "
            f"{stage.resolved('learning_rate')}), check the data, or train in float32 (dtype: float32)."
        ) from None
    train_s = time.perf_counter() - train_started

    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    steps_run = state.global_step - resumed_step
    effective_batch = stage.per_device_train_batch_size * stage.gradient_accumulation_steps * processes
    n_rows = len(trainer.train_dataset)
    seen = steps_run * effective_batch
    if stage.max_steps <= 0:
        seen = min(seen, int(math.ceil(n_rows * stage.num_train_epochs)))
    # KTO: two examples per pair; RLOO: num_generations completions per prompt
    per_pair = {"kto": 2.0, "rloo": float(stage.num_generations)}.get(stage.method, 1.0)
    pairs_seen = seen / per_pair
    if stage.method in ("dpo", "ipo"):
        truncation["n_prompt_too_long"] = len(pairs) - n_rows  # exact: rows TRL dropped
    summary: dict[str, Any] = {
        "method": stage.method,
        "label": stage.label,
        "steps": state.global_step,
        "epochs": _finite(state.epoch),
        "final_loss": _finite(losses[-1]) if losses else None,
        "train_time_s": round(train_s, 3),
        "setup_time_s": round(setup_s, 3),
        "pairs_per_s": round(pairs_seen / train_s, 4) if train_s > 0 else None,
        "examples_per_s": round(seen / train_s, 4) if train_s > 0 else None,
        "n_pairs": len(pairs),
        "n_examples": n_rows,
        **truncation,
        "max_length": stage.max_length,
        "resumed_from_step": resumed_step or None,
        "processes": int(trainer.args.world_size),
        "seed": stage.seed,
        "start_model": start_spec,
        "start_model_in_run": _relative_to(start_spec, run.root),
        "start_source": lm.source,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "base_fingerprint": lm.fingerprint,
        "data_fingerprint": data_fp,
        "precision": inputs["precision"],
        "finetune": stage.finetune,
        "config": stage.model_dump(mode="json"),
        "reference": None,
        "versions": versions(),
    }
    if store is not None:
        summary["reference"] = {"path": f"reference/{RunDir.key(store.inputs)}", "cache_hit": store.was_hit,
                                "compute_time_s": None if store.computed_s is None else round(store.computed_s, 3)}

    if _is_main():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        with run.build(ALIGN_STAGE, inputs) as scratch:
            target = scratch / ("adapter" if stage.finetune == "lora" else "model")
            unwrapped.save_pretrained(target)
            lm.tokenizer.save_pretrained(target)
            if log_path.exists():
                shutil.copyfile(log_path, scratch / LOG_FILE)
            if (work / SNAPSHOT_DIR).is_dir():
                shutil.copytree(work / SNAPSHOT_DIR, scratch / SNAPSHOT_DIR,
                                ignore=shutil.ignore_patterns(".*.tmp"))
            if (work / "runs").is_dir():  # report_to: tensorboard writes under output_dir/runs
                shutil.copytree(work / "runs", scratch / "runs")
            atomic_write_json(scratch / "summary.json", summary)
            write_preferences(pairs, scratch / PAIRS_FILE)  # the data, for `attribute --stage`
        shutil.rmtree(work, ignore_errors=True)
        for parent in (work.parent, work.parent.parent):  # RUN/.work/align, RUN/.work when empty
            with contextlib.suppress(OSError):
                parent.rmdir()
    _barrier()
    return StageResult.from_dir(run.path(ALIGN_STAGE, inputs), cached=False)


# --------------------------------------------------------------------------- recipes and the command


def train_recipe(model: str | Path, stages: Sequence[StageConfig], data: Any, out: Path | str, *,
                 init_adapter: str | Path | None = None, base_dir: Path | None = None,
                 callbacks: Sequence[Any] = ()) -> list[StageResult]:
    """Run stages in order; each later stage starts from the previous one merged (see module doc).

    ``data`` is the default preference data for stages without their own ``data:`` — a path/hub id
    or a sequence of ``PreferencePair``. A stage's own ``data:`` path is relative to ``base_dir``.
    """
    from alignscope.data.preferences import load_preferences, preferences_fingerprint

    run = RunDir(out)
    loaded: dict[str, tuple[list[Any], str]] = {}

    def pairs_for(stage: StageConfig) -> tuple[list[Any], str]:
        source = stage.data
        if source is not None:
            path = Path(source)
            if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
                source = str(base_dir / path)
        elif data is None:
            raise InputError(f"stage {stage.label}: no preference data; pass --data or set 'data:' in the stage")
        elif not isinstance(data, (str, Path)):
            pairs = list(data)
            return pairs, preferences_fingerprint(pairs)
        else:
            source = str(data)
        if source not in loaded:
            pairs = load_preferences(source)
            loaded[source] = (pairs, preferences_fingerprint(pairs))
        return loaded[source]

    results: list[StageResult] = []
    start: str = str(model)
    adapter = init_adapter
    for i, stage in enumerate(stages):
        pairs, fp = pairs_for(stage)
        result = train_stage(start, stage, pairs, run, data_fingerprint=fp, init_adapter=adapter,
                             callbacks=callbacks)
        results.append(result)
        if i < len(stages) - 1:
            start, adapter = str(merged_checkpoint(result, run)), None
    return results


def align_command(model: str, method: str | None, data: str | Path | None, out: str | Path,
                  config: str | Path | None = None, init_adapter: str | Path | None = None,
                  max_steps: int | None = None, epochs: float | None = None, seed: int = 0) -> Path:
    """``alignscope align``: train one stage (or a multi-stage recipe) and return the final stage dir.

    ``method`` sets the method of a single-stage config; with a multi-stage config it must be
    omitted (None) or equal the last stage's method. ``max_steps``/``epochs`` override every stage.
    ``seed`` applies to every stage unless the config sets ``seed`` itself (a different non-zero
    ``seed`` here is then an error, not a silent choice).
    """
    if method is not None and method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if max_steps is not None and max_steps < 1:
        raise InputError(f"--max-steps {max_steps}: must be a positive number of optimizer steps")
    if epochs is not None and not epochs > 0:
        raise InputError(f"--epochs {epochs}: must be positive")
    if init_adapter is not None and not (Path(init_adapter) / "adapter_config.json").exists():
        raise InputError(f"--init-adapter {init_adapter}: no adapter_config.json; pass a PEFT adapter directory")
    stages = load_stage_config(config) if config is not None else parse_stages({}, "defaults")
    raw = [s.model_dump(exclude_unset=True, mode="json") for s in stages]
    if method is not None:
        if len(raw) == 1:
            raw[0]["method"] = method
        elif stages[-1].method != method:
            raise InputError(f"--method {method}: the config is a {len(raw)}-stage recipe ending in "
                             f"{stages[-1].method}; omit --method or make them agree")
    for entry, stage in zip(raw, stages, strict=True):
        if max_steps is not None:
            entry["max_steps"] = max_steps
        if epochs is not None:
            entry["num_train_epochs"] = epochs
        if "seed" in stage.model_fields_set:
            if seed not in (0, stage.seed):
                raise InputError(f"--seed {seed} conflicts with seed: {stage.seed} in stage {stage.label} of {config}")
        else:
            entry["seed"] = seed
    stages = parse_stages({"stages": raw}, str(config or "command line"))
    base_dir = Path(config).resolve().parent if config is not None else None
    results = train_recipe(model, stages, data, out, init_adapter=init_adapter, base_dir=base_dir)
    return results[-1].path
