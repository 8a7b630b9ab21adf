"""Resource guards: a load or training stage that clearly cannot fit is refused with one line.

The machine's real memory and disk are replaced by monkeypatched numbers, so the refusals are
tested without exhausting anything; the last test checks the real functions return sane values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignscope import guards
from alignscope.errors import InputError

GIB = 1024**3


def test_parameter_count_comes_from_safetensors_headers(tiny_model_dir: Path, tiny_lm) -> None:
    unique = {t.data_ptr(): t.numel() for t in tiny_lm.model.state_dict().values()}  # tied weights once
    assert guards.checkpoint_parameters(tiny_model_dir) == sum(unique.values())


def test_load_refuses_when_memory_is_clearly_short(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignscope.models import load

    monkeypatch.setattr(guards, "available_memory_bytes", lambda: 1024)  # 1 kB left
    with pytest.raises(InputError) as info:
        load(str(tiny_model_dir), dtype="float32")
    message = str(info.value)
    assert "needs at least" in message and "memory" in message and str(tiny_model_dir) in message
    assert "--dtype bfloat16" in message and guards.SKIP_ENV in message and "\n" not in message


def test_load_passes_with_enough_memory_and_skip_switch(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignscope.models import load

    monkeypatch.setattr(guards, "available_memory_bytes", lambda: 64 * GIB)
    assert load(str(tiny_model_dir), dtype="float32").model is not None
    monkeypatch.setattr(guards, "available_memory_bytes", lambda: 1024)
    monkeypatch.setenv(guards.SKIP_ENV, "1")
    assert load(str(tiny_model_dir), dtype="float32").model is not None


def test_full_finetune_refuses_short_disk_and_memory(tiny_model_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    params = guards.checkpoint_parameters(tiny_model_dir)
    assert params is not None
    monkeypatch.setattr(guards, "available_memory_bytes", lambda: 64 * GIB)
    monkeypatch.setattr(guards, "free_disk_bytes", lambda path: 1024)
    with pytest.raises(InputError, match="free disk") as info:
        guards.check_training("tiny", tiny_model_dir, 4, True, tmp_path / "run", 2)
    assert "save_total_limit" in str(info.value) and str(tmp_path / "run") in str(info.value)
    guards.check_training("tiny", tiny_model_dir, 4, False, tmp_path / "run", 2)  # LoRA: no disk floor
    # memory: the full fine-tuning floor is 16 bytes/parameter; LoRA's is the weights once
    monkeypatch.setattr(guards, "free_disk_bytes", lambda path: 1024 * GIB)
    monkeypatch.setattr(guards, "available_memory_bytes", lambda: params * 8)
    with pytest.raises(InputError, match="finetune: lora"):
        guards.check_training("tiny", tiny_model_dir, 4, True, tmp_path / "run", 2)
    guards.check_training("tiny", tiny_model_dir, 4, False, tmp_path / "run", 2)


def test_align_command_refuses_before_training(tiny_model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI: exit 2, one line, and no run directory left behind."""
    from alignscope.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}\n')
    config = tmp_path / "full.yaml"
    config.write_text("method: sft\nfinetune: full\n")
    monkeypatch.setattr(guards, "free_disk_bytes", lambda path: 1024)
    with pytest.raises(SystemExit) as exit_info:
        main(["align", "--model", str(tiny_model_dir), "--config", str(config), "--data", str(data),
              "--out", str(tmp_path / "run"), "--max-steps", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignscope: error:")]
    assert exit_info.value.code == 2 and len(err) == 1 and "free disk" in err[0]
    assert not (tmp_path / "run").exists()


def test_real_probes_return_plausible_numbers(tmp_path: Path) -> None:
    memory = guards.available_memory_bytes()
    disk = guards.free_disk_bytes(tmp_path / "not" / "yet" / "created")
    assert memory is None or memory > 0
    assert disk is not None and disk > 0
