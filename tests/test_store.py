"""Run directory: keyed artefacts, atomic builds, manifest."""

from __future__ import annotations

import json

import pytest

from alignscope.errors import InputError
from alignscope.store import RunDir, atomic_write_json, content_hash


def test_build_then_find_is_keyed_by_inputs(tmp_path):
    run = RunDir(tmp_path / "run")
    inputs = {"model": "abc", "probe": "covert", "limit": 10}
    assert run.find("audit", inputs) is None
    with run.build("audit", inputs) as scratch:
        (scratch / "items.txt").write_text("x")
    found = run.find("audit", inputs)
    assert found is not None and found.file("items.txt").read_text() == "x"
    assert run.find("audit", {**inputs, "limit": 11}) is None
    assert run.latest("audit") == found
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["artefacts"]["audit"]["key"] == found.key == content_hash(inputs)


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with run.build("audit", {"a": 1}) as scratch:
            (scratch / "half.parquet").write_text("partial")
            raise RuntimeError("killed")
    assert run.find("audit", {"a": 1}) is None
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "run" / "audit").iterdir())
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_atomic_writes_follow_the_umask_not_mkstemps_0600(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "shared.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644


def test_atomic_json_and_bad_names(tmp_path):
    atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]
    with pytest.raises(InputError):
        RunDir(tmp_path / "a" / "b.json")
    with pytest.raises(InputError):
        RunDir(tmp_path / "r").find("../escape", {})
