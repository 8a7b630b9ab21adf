"""``load(spec)``: one entry point for built-in names, local directories and hub ids.

Users pass whatever they would pass to transformers; we add the built-in offline models, a PEFT
adapter, a sensible dtype/device default for the machine, and a fingerprint that identifies the
exact weights + adapter + tokenizer so caches can never serve results of a different model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignscope.errors import InputError
from alignscope.models.builtin import BUILTINS, ensure_converted


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and identity; what the engine and trainers consume."""

    model: Any  # transformers PreTrainedModel or peft PeftModel
    tokenizer: Any
    spec: str
    adapter: str | None = None
    source: str = ""  # local directory the weights came from ("" for in-memory models)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """Hash of weights (incl. adapter), tokenizer vocabulary and chat template, and dtype.

        Hashing parameter bytes (≈0.3 s for 135M params) is uniform across built-ins, local
        directories, hub models and freshly trained in-memory models, so it cannot go stale.
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint_model(self.model, self.tokenizer)
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights in place (e.g. training)."""
        self._fingerprint = None


def fingerprint_model(model: Any, tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.

    On this project's reference CPU bf16 is 2–3× faster than fp32 with log-prob error well below
    0.5 nats per sequence; on CPUs without bf16 units it is slower, hence the check.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            from accelerate import PartialState

            return PartialState().device
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc


def resolve_source(spec: str) -> tuple[str, bool]:
    """Map a spec to (path-or-hub-id, is_local). Built-ins are converted on first use."""
    if spec in BUILTINS:
        return str(ensure_converted(spec)), True
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model {spec}: is a file; pass the directory that holds config.json")
        if not (path / "config.json").exists():
            raise InputError(
                f"model {spec}: directory has no config.json; pass a transformers checkpoint "
                f"directory (save_pretrained output) or a built-in name ({', '.join(BUILTINS)})"
            )
        return str(path), True
    is_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))
    if is_hub_id:
        return spec, False
    if "/" in spec or spec.startswith((".", "~")):
        raise InputError(f"model {spec}: no such directory; check the path, or pass a hub id 'org/name'")
    raise InputError(
        f"model {spec!r}: unknown built-in and not a directory; built-ins are "
        f"{', '.join(BUILTINS)} (see `alignscope models list`), or pass a path or hub id 'org/name'"
    )


def load(
    spec: str,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM (+ optional PEFT adapter) from a built-in name, local directory or hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    source, is_local = resolve_source(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if is_local:  # an OOM kill gives no message at all, so refuse what clearly cannot fit
        from alignscope.guards import check_model_load

        check_model_load(spec, Path(source), torch_dtype.itemsize)
        refuse_pickled_weights(f"model {spec}", Path(source))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "directory" if is_local else "hub id (offline? set a local path instead)"
        raise InputError(f"model {spec}: cannot read its config as a {where}: {_first_line(exc)}") from exc
    architectures = getattr(config, "architectures", None) or []
    causal_heads = ("ForCausalLM", "LMHeadModel")
    wrong_head = architectures and not any(a.endswith(causal_heads) for a in architectures)
    if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or wrong_head) and not trust_remote_code:
        raise InputError(
            f"model {spec}: {architectures or config.model_type} is not a causal language model; "
            "alignscope needs a decoder-only LM (e.g. Llama, Gemma, Qwen, SmolLM2)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"model {spec}: no usable tokenizer ({_first_line(exc)}); save the tokenizer next to "
            "the weights with tokenizer.save_pretrained(DIR)"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(  # safetensors only: a user's file is never unpickled
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"model {spec}: cannot load weights: {_first_line(exc)}") from exc
    prepare_tokenizer(tokenizer)
    model.to(dev)
    model.eval()
    if adapter is not None:
        model = attach_adapter(model, adapter, spec)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec,
                       adapter=str(adapter) if adapter else None, source=source if is_local else spec)


def refuse_pickled_weights(what: str, directory: Path) -> None:
    """Refuse a checkpoint directory whose weights exist only as pickles (``pytorch_model*.bin``,
    ``*.pt``/``*.pth``): loading one runs code from the file, so it is never loaded here. ``what``
    names the directory in the message (e.g. ``model DIR``)."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in ("pytorch_model*.bin", "*.pt", "*.pth") for p in directory.glob(pattern))
    if pickled:
        raise InputError(f"{what}: its weights are a pickle ({pickled[0]}), which alignscope does not load; "
                         "re-save them with model.save_pretrained(DIR, safe_serialization=True)")


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give the tokenizer a pad token (batched scoring/generation needs one)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def attach_adapter(model: Any, adapter: str | Path, spec: str) -> Any:
    """Attach a PEFT adapter, refusing one that was trained on another base architecture."""
    from peft import PeftConfig, PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise InputError(f"adapter {adapter}: no adapter_config.json; pass a PEFT adapter directory")
    if not (path / "adapter_model.safetensors").exists() and (path / "adapter_model.bin").exists():
        # PEFT would unpickle it; a user's file is never unpickled here
        raise InputError(f"adapter {adapter}: its weights are a pickle (adapter_model.bin), which alignscope does "
                         "not load; re-save it with model.save_pretrained(DIR, safe_serialization=True)")
    try:
        peft_config = PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(
            f"adapter {adapter}: adapter_config.json is not a valid PEFT adapter config ({_first_line(exc)}); "
            "re-save the adapter with model.save_pretrained(DIR)"
        ) from None
    try:
        wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        base = peft_config.base_model_name_or_path
        trained_on = f" (trained on {base!r})" if base else ""
        raise InputError(
            f"adapter {adapter}: does not fit model {spec}{trained_on}: {_mismatch_line(exc).rstrip('.')}; "
            "pass the --model the adapter was trained on"
        ) from None
    wrapped.eval()
    return wrapped


def _mismatch_line(exc: BaseException) -> str:
    """The informative line of a state-dict error (torch puts "size mismatch for X" on line 2+)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    hits = [line for line in lines if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line]
    return (hits[0] if hits else _first_line(exc))[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
