"""The bad-input corpus (``tests/bad_inputs/*.yaml``): every case must fail the way a user can act on.

Each case is data, not code: the command line, the files to create first, and substrings the error
line must contain (the input's name, the place such as ``line 3``, and the fix). The contract a
case checks is the one in ``docs/reliability.md``:

* exit code 2;
* stderr is exactly one line, starting ``alignscope: error:``, of bounded length (a 5 MB bad line
  must not be echoed back), and no traceback anywhere in stdout or stderr;
* the ``--out`` directory is not created, or, when it existed before, holds no new files.

Cases run in-process through ``alignscope.cli.main`` (the real console entry point) because a
fresh interpreter per case would cost ~5 s of imports on a shared 2-core machine; the cases marked
``subprocess: true`` also run as a real process, to prove the same holds outside pytest.

Case schema (YAML list per file)::

    - id: unique-name
      args: [align, --data, "{tmp}/pairs.jsonl", --out, "{out}"]
      files:                       # optional; paths relative to the case directory {tmp}
        pairs.jsonl: "text"        # UTF-8 text (placeholders expanded)
        other.csv: {text: "é", encoding: latin-1}
        big.jsonl: {text: '{"prompt": "{fill}"', fill: 5000000}   # {fill} = that many 'x'
      out_exists: false            # true: create {out} with a file first; nothing new may appear
      expect: ["pairs.jsonl", "line 2", "not valid JSON"]
      absent: [kept.jsonl]         # further outputs (relative to {tmp}) that must not appear
      subprocess: false

Placeholders: ``{tmp}`` the case directory, ``{out}`` = ``{tmp}/run``, and the prepared models in
``model_fixtures`` (``{tiny}``, ``{tiny_no_tokenizer}``, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

CORPUS = Path(__file__).parent / "bad_inputs"
MAX_MESSAGE = 1000  # characters; a message that quotes user data must clip it
PROGRESS = re.compile(r"\d+%\|")


def _load_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text(encoding="utf-8")) or []:
            case["_file"] = path.name
            cases.append(case)
    return cases


CASES = _load_cases()


def test_corpus_is_large_and_ids_unique() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40, len(ids)
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]
    for case in CASES:
        assert set(case) <= {"id", "args", "files", "out_exists", "expect", "subprocess", "why", "absent",
                             "_file"}, case["id"]
        assert case["expect"], f"{case['id']}: say what the message must contain"


# --------------------------------------------------------------------------- prepared models


@pytest.fixture(scope="session")
def model_fixtures(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Broken variants of the tiny checkpoint that a user could plausibly point us at."""
    root = tmp_path_factory.mktemp("bad-models")
    weights = [p for p in tiny_model_dir.iterdir() if p.name in ("config.json", "generation_config.json")
               or p.suffix == ".safetensors"]

    no_tok = root / "no-tokenizer"
    no_tok.mkdir()
    for p in weights:
        shutil.copy(p, no_tok / p.name)

    no_weights = root / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights)
    for p in no_weights.glob("*.safetensors"):
        p.unlink()

    no_template = root / "no-chat-template"
    shutil.copytree(tiny_model_dir, no_template)
    _drop_chat_template(no_template)

    return {"tiny": str(tiny_model_dir), "tiny_no_tokenizer": str(no_tok), "tiny_no_weights": str(no_weights),
            "tiny_no_template": str(no_template), "adapter_other_base": str(_adapter_for_other_base(root))}


def _drop_chat_template(directory: Path) -> None:
    for p in directory.glob("chat_template*"):
        p.unlink()
    config = directory / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))


def _adapter_for_other_base(root: Path) -> Path:
    """A LoRA adapter saved for a Llama of another width: attaching it to the tiny model must fail."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    peft = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = root / "adapter-other-base"
    peft.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-base"  # what a hub-trained adapter records
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


# --------------------------------------------------------------------------- running a case


def _expand(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _materialise(case: dict[str, Any], tmp: Path, values: dict[str, str]) -> None:
    for name, spec in (case.get("files") or {}).items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, str):
            path.write_bytes(_expand(spec, values).encode("utf-8"))
            continue
        text = _expand(spec.get("text", ""), values)
        if "fill" in spec:
            text = text.replace("{fill}", "x" * int(spec["fill"]))
        path.write_bytes(text.encode(spec.get("encoding", "utf-8")))


def _snapshot(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*")} if out.exists() else set()


def _prepare(case: dict[str, Any], tmp: Path, models: dict[str, str]) -> tuple[list[str], Path, set[str] | None]:
    out = tmp / "run"
    values = {"tmp": str(tmp), "out": str(out), **models}
    _materialise(case, tmp, values)
    before: set[str] | None = None
    if case.get("out_exists"):
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("the user's own file\n")
        before = _snapshot(out)
    return [_expand(str(a), values) for a in case["args"]], out, before


def _without_progress_bars(stderr: str) -> list[str]:
    """stderr lines minus tqdm bars (``Loading weights: 100%|###|``), which are drawn with carriage
    returns while a model loads and are not messages."""
    segments = [s for line in stderr.split("\n") for s in line.split("\r")]
    return [s for s in segments if s.strip() and not PROGRESS.search(s)]


def _check(case: dict[str, Any], code: int | None, stdout: str, stderr: str, out: Path,
           before: set[str] | None) -> None:
    label = f"{case['_file']}::{case['id']}"
    assert code == 2, f"{label}: exit code {code}; stderr: {stderr[-3000:]}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, f"{label}: {stderr[-3000:]}"
    lines = _without_progress_bars(stderr)
    assert len(lines) == 1, f"{label}: expected one stderr line, got {len(lines)}: {stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("alignscope: error: "), f"{label}: {line}"
    assert len(line) <= MAX_MESSAGE, f"{label}: message of {len(line)} characters: {line[:300]}..."
    for fragment in case["expect"]:
        assert fragment in line, f"{label}: {fragment!r} missing from: {line}"
    for name in case.get("absent", []):
        assert not (out.parent / name).exists(), f"{label}: {name} was written"
    if before is None:
        assert not out.exists(), f"{label}: {out} was created: {sorted(_snapshot(out))[:10]}"
    else:
        assert _snapshot(out) == before, f"{label}: new files in {out}: {sorted(_snapshot(out) - before)}"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_in_process(case: dict[str, Any], tmp_path: Path, model_fixtures: dict[str, str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    from alignscope.cli import main

    args, out, before = _prepare(case, tmp_path, model_fixtures)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    _check(case, exit_info.value.code, captured.out, captured.err, out, before)


SUBPROCESS_CASES = [c for c in CASES if c.get("subprocess")]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c["id"] for c in SUBPROCESS_CASES])
def test_bad_input_as_a_real_process(case: dict[str, Any], tmp_path: Path, model_fixtures: dict[str, str]) -> None:
    """A few cases again through a fresh interpreter: what a shell user sees, warnings included."""
    args, out, before = _prepare(case, tmp_path, model_fixtures)
    done = subprocess.run([sys.executable, "-m", "alignscope.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={**os.environ})
    _check(case, done.returncode, done.stdout, done.stderr, out, before)
