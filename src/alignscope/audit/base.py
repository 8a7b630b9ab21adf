"""The probe protocol: items + how items become engine requests + how results become metrics.

A probe never loops over a model itself; it builds ``ScoreRequest``/``GenerateRequest`` lists and
hands them to the engine, which batches, shares contexts and caches. Every metric is a function of
one per-item column, so two models audited on the same items can always be compared pairwise
(``alignscope compare``) with the same statistic that produced the headline number.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from alignscope.errors import InputError
from alignscope.models.engine import Engine


def mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def percent(x: np.ndarray) -> float:
    """Share of items where the 0/1 column is 1, in percent."""
    return float(np.mean(x) * 100.0)


@dataclass(frozen=True)
class Metric:
    """A headline number with enough metadata to judge it.

    ``direction`` says which way is worse; ``ideal`` is the value an unbiased/trustworthy model
    would get (CrowS-Pairs' ideal is 50 %, not 0). The value is ``statistic(items[column])`` over
    the items where the column is not NaN, so paired comparisons reuse exactly this definition.
    """

    name: str
    column: str
    description: str
    unit: str
    range: tuple[float, float]
    direction: Literal["higher_is_worse", "higher_is_better", "further_from_ideal_is_worse"]
    ideal: float
    statistic: Callable[[np.ndarray], float] = mean
    binary: bool = False  # the column holds 0/1 outcomes (McNemar in comparisons)

    def compute(self, items: pd.DataFrame) -> float:
        if self.column not in items:
            raise RuntimeError(f"metric {self.name}: item column {self.column!r} missing (probe bug)")
        values = items[self.column].dropna().to_numpy(dtype=float)
        if values.size == 0:
            raise InputError(f"metric {self.name}: no items to compute it on; use more items (--limit)")
        value = float(self.statistic(values))
        if not np.isfinite(value):
            raise RuntimeError(f"metric {self.name}: computed a non-finite value ({value})")
        return value

    def verdict(self, before: float, after: float) -> str:
        """'better', 'worse' or 'unchanged' for a change from ``before`` to ``after``."""
        if np.isclose(before, after):
            return "unchanged"
        if self.direction == "higher_is_worse":
            return "worse" if after > before else "better"
        if self.direction == "higher_is_better":
            return "better" if after > before else "worse"
        return "worse" if abs(after - self.ideal) > abs(before - self.ideal) else "better"

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "column": self.column, "description": self.description,
                "unit": self.unit, "direction": self.direction,
                "range": [v if np.isfinite(v) else None for v in self.range],  # JSON has no Infinity
                "ideal": self.ideal, "statistic": self.statistic.__name__, "binary": self.binary}


@dataclass
class ProbeResult:
    """Per-item table (one row per item, ``item_id`` unique) plus probe-specific extras.

    ``tables`` holds secondary tables the report shows (e.g. per-adjective associations, the
    24 × 16 agreement matrix); ``notes`` says how this run differs from the paper's protocol.
    """

    items: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Probe(ABC):
    """Base class of every probe. Subclasses set the class attributes and implement ``run``.

    ``load_items`` returns the item table (embedded default, or the user's file in the official
    format when ``data`` is given); ``run`` turns items into engine requests and results into the
    per-item columns that the ``metrics`` read.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    data_formats: ClassVar[str] = "embedded default only"
    requires_data: ClassVar[bool] = False  # no embedded default: runs only with --data
    #: The metric attribution explains when none is named (probes with a ``measurement``); None: the
    #: first of ``metrics``. It differs where the first metric is a share or a generation rate.
    attribution_metric: ClassVar[str | None] = None

    #: The options the probe accepts, where neither ``DEFAULTS`` nor the constructor's keyword
    #: parameters name them (see :meth:`option_names`).
    OPTION_NAMES: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option names this probe accepts: ``OPTION_NAMES``, else its ``DEFAULTS`` keys, else its
        constructor's keyword parameters. One source, so ``probes list`` and the refusal agree."""
        if cls.OPTION_NAMES is not None:
            return cls.OPTION_NAMES
        defaults = getattr(cls, "DEFAULTS", None)
        if isinstance(defaults, dict):
            return tuple(defaults)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.name != "self" and p.kind in kinds)

    @classmethod
    def refuse_unknown_options(cls, options: Iterable[str]) -> None:
        """One line naming options the probe does not have: a typo must not run the defaults silently."""
        unknown = set(options) - set(cls.option_names())
        if unknown:
            raise InputError(f"{cls.name} probe: unknown option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(cls.option_names())}")

    @abstractmethod
    def load_items(self, data: Path | None = None, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
        """The item table: embedded default, or the user's file when ``data`` is given."""

    @abstractmethod
    def run(self, engine: Engine, items: pd.DataFrame) -> ProbeResult:
        """Build requests, send them through ``engine``, and return per-item scores."""

    @classmethod
    def options_for(cls, pairs: Sequence[Any]) -> dict[str, Any]:
        """The options that make this probe measure what ``pairs`` planted ({} when they planted
        nothing it reads).

        Why: a probe that reads planted ground truth must read *this* data's planting. With pairs
        planted about lawyers, planted_bias has to ask about lawyers; with a canary planted, the
        privacy probe has to test that very secret. Studies and ``alignscope attribute`` start from
        these and let options the user set win. It sits beside :meth:`ground_truth` for the same
        reason: only the probe knows which planting its measurement reads.
        """
        return {}

    def ground_truth(self, metric: str, pairs: Sequence[Any]) -> tuple[str, list[bool]] | None:
        """Which training pairs attributing ``metric`` should find, when the data planted them.

        Returns (what they are, e.g. ``"planted"``; one label per pair), or None when this probe's
        measurement has no planted ground truth in ``pairs``. Why the probe decides: only it knows
        which planting its measurement reads (the planted stereotype's group, the secret it tests).
        """
        return None

    def config(self) -> dict[str, Any]:
        """Everything that changes results, for artefact keys."""
        return {"probe": self.name, "options": self.options}


def limit_items(items: pd.DataFrame, limit: int | None, seed: int, stratify: str | None = None) -> pd.DataFrame:
    """A seeded, reproducible subset (stratified when a column is given) in a stable order."""
    if limit is None or limit >= len(items):
        return items.reset_index(drop=True)
    if limit < 1:
        raise InputError(f"--limit {limit}: must be a positive number of items")
    if stratify and stratify in items:
        # Round-robin over strata in a seeded order, so exactly ``limit`` items come back and
        # every stratum is represented as evenly as the limit allows.
        shuffled = items.sample(frac=1.0, random_state=seed)
        rank = shuffled.groupby(stratify, sort=False).cumcount()
        picked = shuffled.assign(_rank=rank).sort_values(["_rank", stratify], kind="stable").head(limit)
        return items.loc[picked.index.sort_values()].reset_index(drop=True)
    return items.sample(limit, random_state=seed).sort_index().reset_index(drop=True)


PROBES: dict[str, type[Probe]] = {}


def register(cls: type[Probe]) -> type[Probe]:
    """Class decorator: make a probe available to ``alignscope audit --probes``."""
    PROBES[cls.name] = cls
    return cls


def score_options(engine: Engine, contexts: list[str], options: list[str], *, chat: bool = False,
                  system: str | None = None, normalise: bool = False) -> np.ndarray:
    """Log-prob of each option after each context: an (n_contexts, n_options) array.

    The usual way to read a model's choice without generation (agree/disagree, wrong/not wrong,
    answer options). ``normalise=True`` divides by the option's token count, for options of very
    different lengths. All options of one context share its computation in the engine.
    """
    from alignscope.models.requests import ScoreRequest

    requests = [ScoreRequest(c, o, chat=chat, system=system) for c in contexts for o in options]
    results = engine.score(requests)
    values = [r.logprob / len(r.token_ids) if normalise else r.logprob for r in results]
    return np.asarray(values, dtype=float).reshape(len(contexts), len(options))


def is_refusal(text: str, markers: list[str] | None = None) -> bool:
    """Rule-based refusal detector: a reply opening with or containing a refusal phrase.

    Curly apostrophes are normalised first because models emit both forms.
    """
    phrases = markers if markers is not None else _default_markers()
    normalised = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return any(p in normalised for p in phrases) if phrases else False


_MARKERS: list[str] = []


def _default_markers() -> list[str]:
    if not _MARKERS:
        from alignscope.data.embedded import load_refusal_markers

        _MARKERS.extend(load_refusal_markers())
    return _MARKERS
