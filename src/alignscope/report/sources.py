"""Find a run's stored artefacts: through ``study.json`` for a study, or the manifest of an audit run.

The report never walks stage internals on its own: a study run is read only through the paths its
index names, and a plain ``alignscope audit`` run through ``audited_probes``. Every read goes
through :class:`RunSources` so each block can say which file (relative to the run) it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alignscope.errors import InputError
from alignscope.store import MANIFEST, Artefact

STUDY_INDEX = "study.json"


class MissingArtefact(Exception):
    """A file the index names is not there (or not readable): the section says so, the report goes on."""


@dataclass
class RunSources:
    """Reader for one run directory: study index, audits per model, and relative source paths."""

    root: Path
    study: dict[str, Any] | None
    audits: dict[str, dict[str, Artefact]] = field(default_factory=dict)
    audit_errors: dict[str, str] = field(default_factory=dict)

    @property
    def is_study(self) -> bool:
        return self.study is not None

    def rel(self, path: Path | str) -> str:
        """A path relative to the run (what ``report.json`` records as a block's source)."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def path(self, rel: str) -> Path:
        """Resolve a path named in ``study.json``; refuse ones that escape the run directory."""
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise MissingArtefact(f"{rel}: points outside the run directory; not read")
        return target

    def json(self, path: Path | str) -> dict[str, Any]:
        path = self.path(path) if isinstance(path, str) else path
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingArtefact(f"{self.rel(path)} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MissingArtefact(f"{self.rel(path)} is not valid JSON ({exc})") from None

    def parquet(self, path: Path | str) -> pd.DataFrame:
        path = self.path(path) if isinstance(path, str) else path
        if not path.is_file():
            raise MissingArtefact(f"{self.rel(path)} is missing")
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise MissingArtefact(f"{self.rel(path)} could not be read ({type(exc).__name__})") from None

    def jsonl(self, path: Path) -> list[dict[str, Any]]:
        """JSON lines, skipping a torn last line (a log written while a run was killed)."""
        if not path.is_file():
            raise MissingArtefact(f"{self.rel(path)} is missing")
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def entry(self, key: str) -> Any:
        """A key of ``study.json`` (None for a plain audit run or when the stage was not run)."""
        return None if self.study is None else self.study.get(key)

    def probe_models(self, probe: str) -> dict[str, Artefact]:
        """For one probe, the audit artefact of every model that ran it, in model order."""
        return {model: probes[probe] for model, probes in self.audits.items() if probe in probes}

    def audit_summary(self, artefact: Artefact) -> dict[str, Any]:
        return self.json(artefact.file("summary.json"))

    def audit_table(self, artefact: Artefact, name: str) -> pd.DataFrame:
        return self.parquet(artefact.file(f"tables/{name}.parquet"))


def open_run(run: Path | str) -> RunSources:
    """Discover what a run directory holds; ``InputError`` when it is not a run at all."""
    root = Path(run)
    if not root.is_dir():
        raise InputError(f"{run}: not a run directory; pass the --out directory of `alignscope study` or `audit`")
    index = root / STUDY_INDEX
    if index.is_file():
        return _open_study(root, index)
    if not (root / MANIFEST).is_file():
        raise InputError(f"{run}: holds neither {STUDY_INDEX} nor audit results; "
                         "run `alignscope study --out DIR` or `alignscope audit --out DIR` first")
    return RunSources(root=root, study=None, audits={root.resolve().name: _audits_or_fail(root)})


def _open_study(root: Path, index: Path) -> RunSources:
    try:
        study = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{index}: not valid JSON ({exc}); rerun `alignscope study` to rewrite it") from None
    if not isinstance(study, dict):
        raise InputError(f"{index}: expected a JSON object (the study index)")
    sources = RunSources(root=root, study=study)
    audits = study.get("audits") or {}
    if not isinstance(audits, dict):
        raise InputError(f"{index}: 'audits' must map model names to audit directories")
    for model, rel in audits.items():
        try:
            sources.audits[str(model)] = _audits_or_fail(sources.path(str(rel)))
        except (InputError, MissingArtefact) as exc:
            sources.audit_errors[str(model)] = str(exc)
    return sources


def _audits_or_fail(path: Path) -> dict[str, Artefact]:
    from alignscope.audit.runner import audited_probes

    if not path.is_dir():
        raise MissingArtefact(f"{path}: audit directory is missing")
    return audited_probes(path)
