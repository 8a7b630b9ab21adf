"""Security: no code execution from user files, and no path escaping from user-chosen names.

Source-tree checks are greps over ``src/`` (cheap, and they catch a regression in any package,
including ones added later); behavioural checks feed hostile inputs to the real entry points.
HTML escaping of model outputs and data strings belongs to the report package and is tested there
(``tests/test_report*.py``); see docs/reliability.md.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from alignscope.errors import InputError
from alignscope.store import RunDir

SRC = Path(__file__).resolve().parents[1] / "src" / "alignscope"


def _source_lines() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if code.strip():
                out.append((str(path.relative_to(SRC)), number, code))
    return out


# Each pattern is a way to turn bytes from a file into running code.
UNSAFE = {
    "pickle / dill / joblib deserialisation": re.compile(r"\b(c?pickle|dill|joblib|cloudpickle)\.loads?\("),
    "pandas read_pickle": re.compile(r"\bread_pickle\("),
    "yaml.load without SafeLoader": re.compile(r"\byaml\.(load|unsafe_load|full_load|load_all)\("),
    "numpy load with allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "eval/exec of text": re.compile(r"(?<![\w.])(eval|exec)\("),
    "trust_remote_code switched on": re.compile(r"trust_remote_code\s*=\s*True"),
    "pickle-based checkpoint format": re.compile(r"safe_serialization\s*=\s*False"),
}


@pytest.mark.parametrize("rule", sorted(UNSAFE))
def test_source_has_no_unsafe_deserialisation(rule: str) -> None:
    hits = [f"{f}:{n}: {c.strip()}" for f, n, c in _source_lines() if UNSAFE[rule].search(c)]
    assert not hits, f"{rule}: " + "; ".join(hits)


def test_every_torch_load_is_weights_only() -> None:
    """``torch.load`` unpickles; ``weights_only=True`` restricts it to tensors and plain containers."""
    text = {p: p.read_text(encoding="utf-8") for p in SRC.rglob("*.py")}
    bad = []
    for path, source in text.items():
        for match in re.finditer(r"torch\.load\(", source):
            call = source[match.start():source.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                bad.append(f"{path.relative_to(SRC)}: {call}")
    assert not bad, bad


def test_yaml_is_only_safe_loaded() -> None:
    loads = [f"{f}:{n}" for f, n, c in _source_lines() if re.search(r"\byaml\.\w*load\w*\(", c)]
    unsafe = [f"{f}:{n}" for f, n, c in _source_lines()
              if re.search(r"\byaml\.\w*load\w*\(", c) and "safe_load" not in c]
    assert loads and not unsafe, unsafe


def test_trust_remote_code_defaults_off_and_cli_cannot_enable_it() -> None:
    from alignscope.models.loading import load

    assert inspect.signature(load).parameters["trust_remote_code"].default is False
    cli = (SRC / "cli.py").read_text(encoding="utf-8")
    assert "trust_remote_code" not in cli and "trust-remote-code" not in cli


def test_model_with_custom_code_is_refused_without_running_it(tmp_path: Path) -> None:
    """A checkpoint whose config points at its own Python (``auto_map``) must not import it."""
    from alignscope.models import load

    model = tmp_path / "evil"
    model.mkdir()
    marker = tmp_path / "executed"
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil_lm", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (model / "configuration_evil.py").write_text(payload)
    (model / "modeling_evil.py").write_text(payload)
    with pytest.raises(InputError) as info:
        load(str(model))
    assert "evil" in str(info.value)
    assert not marker.exists()


def test_yaml_config_tags_cannot_run_code(tmp_path: Path) -> None:
    from alignscope.align.config import load_stage_config

    marker = tmp_path / "pwned"
    config = tmp_path / "stage.yaml"
    config.write_text(f"method: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_stage_config(config)
    assert not marker.exists()


ESCAPES = ["..", "../outside", "a/../../b", "/etc", "a/b", "a\\b", ".", "", ".hidden", "a\x00b", "~", "a b",
           "..\u2215x", "x\n"]


@pytest.mark.parametrize("name", ESCAPES, ids=[repr(n) for n in ESCAPES])
def test_stage_names_cannot_escape_the_run_directory(name: str, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with pytest.raises(InputError):
        run.find(name, {})
    with pytest.raises(InputError):
        with run.build(name, {}):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not any(p.name != ".manifest.lock" for p in (tmp_path / "run").iterdir())


def test_artefact_paths_stay_inside_the_run(tmp_path: Path) -> None:
    """Keys are hashes, so whatever the inputs hold (paths, '..'), the artefact lands under RUN/stage."""
    run = RunDir(tmp_path / "run")
    inputs = {"data": "../../etc/passwd", "name": "../x"}
    path = run.path("audit", inputs)
    assert path.resolve().is_relative_to((tmp_path / "run").resolve())
    assert re.fullmatch(r"[0-9a-f]{16}", path.name)


def test_manifest_entries_cannot_redirect_reads(tmp_path: Path) -> None:
    """A hand-edited manifest naming '../..' as a key must not make `latest` read outside the run."""
    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"artefacts": {"audit_crows_pairs": {"key": "../../outside", "path": "x"}}}))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / ".done").write_text("")
    with pytest.raises(InputError):
        run.latest("audit_crows_pairs")


def test_study_arm_names_are_path_safe() -> None:
    """Arm names become directory names in a study run; they are restricted like stage names."""
    from alignscope.study import config
    from pydantic import ValidationError

    for bad in ("../x", "a/b", "base", ""):
        with pytest.raises((ValidationError, InputError, ValueError)):
            config.StudyConfig.model_validate({"arms": {bad: [{"method": "dpo"}]}})
