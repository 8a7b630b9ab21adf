"""Shared fixtures: a tiny random-weight Llama with the real SmolLM2 tokenizer (seconds to build).

The converted SmolLM2 checkpoint (tokenizer + weights) lives in a persistent cache directory so
the GGUF is dequantised once per machine, not once per test run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("ALIGNSCOPE_CACHE", str(REPO / ".alignscope-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test when the reference files are absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} absent (CI provides ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from alignscope.models.builtin import ensure_converted

    return ensure_converted("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer Llama saved like a user checkpoint, so tests also exercise the local-dir path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):
    from alignscope.models import load

    return load(str(tiny_model_dir), dtype="float32")


def free_port() -> str:
    """A TCP port nothing listens on now, for `accelerate launch --main_process_port` (a fixed port
    collides when two suites or helpers run multi-process tests at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
