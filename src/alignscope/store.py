"""Run directories, content-addressed artefacts and atomic writes.

Every stage writes into a run directory. An artefact lives in ``RUN/<stage>/<key>/`` where ``key``
is a hash of everything that produced it (model fingerprint, data fingerprint, config). That makes
a rerun cheap (a finished key is a cache hit), makes sharing a single stage possible, and means an
interrupted stage never leaves a directory that looks finished: artefacts are built in a temporary
directory next to their final place and renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from alignscope.errors import InputError

MANIFEST = "manifest.json"
DONE_MARKER = ".done"


def default_cache_dir() -> Path:
    """Where converted built-in models and the engine's result cache live.

    ``ALIGNSCOPE_CACHE`` overrides it so tests and CI can use a throw-away directory.
    """
    env = os.environ.get("ALIGNSCOPE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "alignscope"
    root.mkdir(parents=True, exist_ok=True)
    return root


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal inputs always hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    """A short, stable hash of a JSON-able object (used for artefact keys)."""
    return hashlib.blake2b(canonical_json(obj).encode(), digest_size=16).hexdigest()[:length]


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """Hash of a file's bytes, for data fingerprints."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_mode() -> int:
    """What ``open()`` would give a new file under the process umask (mkstemp always gives 0600).

    Linux reports the umask in /proc without changing it; elsewhere it is read by setting and
    restoring it, which is briefly visible to other threads.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A reader (or a process killed mid-write) sees either the old file or the new one, never half.
    The file gets the umask's usual mode, so a run directory shared with a team (or served by a
    web server) stays readable, like the memory-mapped arrays written beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """Replace NaN/Infinity (not valid JSON; browsers' JSON.parse rejects them) with null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return json_safe(obj.item())
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2, ensure_ascii=False, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``final`` in one rename when the block succeeds.

    On failure (or SIGKILL) the scratch directory is left under a dot-name and ``final`` is
    untouched, so a half-built artefact can never be mistaken for a finished one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.partial"
    scratch.mkdir()
    try:
        yield scratch
        (scratch / DONE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(scratch, final)
        except OSError:
            # Another process built the same artefact and renamed it into place between our
            # rmtree and our rename (a non-empty directory cannot be replaced). Artefacts are
            # keyed by their inputs, so its copy is as good as ours: keep it, drop ours.
            if not (final / DONE_MARKER).exists():
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def versions() -> dict[str, str]:
    """Versions recorded in every manifest so a result can be traced to its software."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("alignscope", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class Artefact:
    """A finished artefact directory and the inputs that produced it."""

    stage: str
    key: str
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name


class RunDir:
    """A run directory: stage artefacts keyed by input hash, plus a manifest listing them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"run directory {self.root} is a file; pass a directory path with --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".manifest.lock"))

    @staticmethod
    def key(inputs: dict[str, Any]) -> str:
        return content_hash(inputs)

    def _path(self, stage: str, key: str) -> Path:
        # Both parts become path components; '..', '/', NUL or an empty name would let a stage
        # name or a hand-edited manifest key point outside the run directory.
        if not stage.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"stage name {stage!r} must be letters, digits, '-' or '_'")
        if not key.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"{self.root / MANIFEST}: artefact key {key!r} of stage {stage} is not a plain "
                             "name; delete the manifest entry (or the file) to rebuild it")
        return self.root / stage / key

    def path(self, stage: str, inputs: dict[str, Any]) -> Path:
        """Where the artefact for these inputs lives (finished or not)."""
        return self._path(stage, self.key(inputs))

    def find(self, stage: str, inputs: dict[str, Any]) -> Artefact | None:
        """The finished artefact for these inputs, or None (then the stage must run)."""
        key = self.key(inputs)
        path = self._path(stage, key)
        if (path / DONE_MARKER).exists():
            return Artefact(stage, key, path)
        return None

    @contextlib.contextmanager
    def build(self, stage: str, inputs: dict[str, Any]) -> Iterator[Path]:
        """Build an artefact atomically and record it in the manifest when it is complete."""
        key = self.key(inputs)
        final = self._path(stage, key)
        with atomic_directory(final) as scratch:
            atomic_write_json(scratch / "inputs.json", inputs)
            yield scratch
        self._record(stage, key, inputs)

    def latest(self, stage: str) -> Artefact | None:
        """The most recently recorded artefact of a stage (what later stages read by default)."""
        entry = self.manifest().get("artefacts", {}).get(stage)
        if not entry:
            return None
        path = self._path(stage, entry["key"])
        return Artefact(stage, entry["key"], path) if (path / DONE_MARKER).exists() else None

    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); delete it to rebuild the manifest") from exc

    def _record(self, stage: str, key: str, inputs: dict[str, Any]) -> None:
        with self._lock:
            manifest = self.manifest()
            manifest.setdefault("artefacts", {})[stage] = {
                "key": key,
                "path": f"{stage}/{key}",
                "inputs": inputs,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            manifest["versions"] = versions()
            atomic_write_json(self.root / MANIFEST, manifest)
