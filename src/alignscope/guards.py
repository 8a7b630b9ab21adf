"""Resource guards: refuse a model load or a training stage that clearly cannot fit.

Running out of memory on Linux does not raise: the kernel's OOM killer ends the process (or a
neighbour) with SIGKILL, minutes into a run, with no message at all. Running out of disk mid-save
leaves a half-written checkpoint. Both are cheap to foresee from numbers we already have — the
parameter count in the checkpoint's safetensors headers, the dtype, and the method — so we check
before starting and say what to change.

The estimates are deliberately *lower bounds* (weights, gradients and optimizer state only; no
activations): a guard that refuses runs which would have fitted is worse than none, so we refuse
only when even the floor does not fit. Set ``ALIGNSCOPE_SKIP_RESOURCE_CHECK=1`` to bypass.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from alignscope.errors import InputError

SKIP_ENV = "ALIGNSCOPE_SKIP_RESOURCE_CHECK"
GIB = 1024**3

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _skipped() -> bool:
    return os.environ.get(SKIP_ENV, "").lower() in ("1", "true", "yes")


def available_memory_bytes() -> int | None:
    """Memory this process can still get: ``MemAvailable``, capped by a cgroup v2 limit if any.

    None when neither can be read (then no memory check is made).
    """
    values: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            values.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(values) if values else None


def free_disk_bytes(path: Path) -> int | None:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def checkpoint_parameters(directory: Path) -> int | None:
    """Parameter count from the safetensors headers of a checkpoint directory (no weights read).

    A safetensors file starts with an 8-byte header length and a JSON header listing every
    tensor's shape, so this costs a few kB of I/O even for a 70B model. None when the directory
    holds no readable safetensors file (then no memory check is made).
    """
    total = 0
    files = sorted(Path(directory).glob("*.safetensors"))
    for file in files:
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > 100 * 1024**2:
                    return None
                header = json.loads(fh.read(length))
        except (OSError, struct.error, ValueError):
            return None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            count = 1
            for dim in entry.get("shape", []):
                count *= int(dim)
            total += count
    return total or None


def training_floor_bytes(parameters: int, weight_bytes: int, full_finetune: bool) -> int:
    """Least memory a training stage needs, activations not counted.

    Full fine-tuning holds fp32 master weights, gradients and two AdamW moments (16 bytes per
    parameter) — the textbook floor. LoRA holds the frozen weights once plus a reference model
    for DPO-style methods when it is not precomputed; we count the weights once (the floor).
    """
    if full_finetune:
        return parameters * 16
    return parameters * weight_bytes


def check_memory(what: str, needed: int, fix: str) -> None:
    """Refuse when ``needed`` bytes clearly exceed what this process can get."""
    if _skipped():
        return
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise InputError(
            f"{what}: needs at least {needed / GIB:.1f} GiB of memory but only {available / GIB:.1f} GiB is "
            f"available; {fix} (or set {SKIP_ENV}=1 to try anyway)")


def check_disk(what: str, path: Path, needed: int, fix: str) -> None:
    """Refuse when the file system of ``path`` has clearly too little free space for ``needed`` bytes."""
    if _skipped():
        return
    free = free_disk_bytes(path)
    if free is not None and needed > free:
        raise InputError(
            f"{what}: needs at least {needed / GIB:.2f} GiB of free disk under {path} but only "
            f"{free / GIB:.2f} GiB is free; {fix} (or set {SKIP_ENV}=1 to try anyway)")


def check_model_load(spec: str, directory: Path, dtype_bytes: int) -> None:
    """Before loading a local checkpoint: do its weights fit in memory at the requested dtype?"""
    parameters = checkpoint_parameters(directory)
    if parameters is None:
        return
    check_memory(f"model {spec} ({parameters / 1e6:.0f}M parameters)", parameters * dtype_bytes,
                 "free memory, use --dtype bfloat16, or pick a smaller model")


def check_training(spec: str, directory: Path | None, weight_bytes: int, full_finetune: bool,
                   run_dir: Path, checkpoints_kept: int) -> None:
    """Before a training stage: memory floor for the method, and disk for what it will save.

    Disk: full fine-tuning saves fp32 weights plus optimizer state (~12 bytes/parameter) in each
    kept checkpoint and the final weights (4 bytes/parameter); LoRA adapters are small, so only
    full fine-tuning is checked.
    """
    parameters = checkpoint_parameters(directory) if directory is not None else None
    if parameters is None:
        return
    check_memory(f"training {spec} ({parameters / 1e6:.0f}M parameters, "
                 f"{'full fine-tuning' if full_finetune else 'LoRA'})",
                 training_floor_bytes(parameters, weight_bytes, full_finetune),
                 "use finetune: lora, dtype: bfloat16, or a smaller model")
    if full_finetune:
        needed = parameters * (4 + 12 * max(checkpoints_kept, 1))
        check_disk(f"training {spec} (full fine-tuning)", run_dir, needed,
                   "free disk space, lower save_total_limit, or use finetune: lora")
