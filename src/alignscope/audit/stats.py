"""Paired statistics for comparing two models on the same items.

Why *paired*
------------
An audit asks "did alignment change model behaviour on these prompts?", and
both models answer the *same* prompts.  Item difficulty is usually the largest
source of variance (some prompts elicit stereotypes from any model, others from
none), and it is shared by A and B.  Working with the per-item pair
``(a_i, b_i)`` cancels that shared variance, so a paired analysis is both
valid (it does not pretend the two vectors are independent samples) and far
more powerful than comparing two independent means.  Every procedure here
keeps the pairing:

* the bootstrap resamples *items*, taking A's and B's score of each drawn item
  together (the same indices for both vectors);
* the permutation test swaps A and B *within* an item, which is exactly the
  exchangeability that the null hypothesis "the two models are
  interchangeable on every item" implies;
* for 0/1 outcomes, McNemar's test looks only at discordant items (those where
  the models disagree), the paired analogue of comparing two proportions.

Why Holm
--------
An audit reports many metrics at once, and with twenty metrics one is expected
to cross p < 0.05 by chance alone.  :func:`holm` controls the family-wise error
rate (the chance of *any* false "significant") under arbitrary dependence
between the metrics -- metrics computed on the same items are strongly
dependent, so procedures that assume independence are not safe -- and it is
uniformly more powerful than plain Bonferroni.

Nothing in this module touches a model; it works on score vectors and is pure
numpy/scipy, deterministic given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.stats import binomtest

from alignscope.errors import InputError

__all__ = [
    "PairedComparison",
    "Statistic",
    "align_items",
    "compare_paired",
    "holm",
]

Statistic = Callable[[np.ndarray], float]
"""A metric as a function of one model's per-item score vector."""

# Upper bound on the number of array elements materialised at once by the
# vectorised bootstrap / permutation (int64 indices or float64 values: 32 MiB).
# Resamples are processed in row blocks of this size, so memory stays bounded
# for large item sets while each block is a single matrix operation.
_MAX_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PairedComparison:
    """Result of comparing model A and model B on one metric over the same items.

    Attributes:
        metric: Name of the metric (a label; e.g. ``"refusal_rate"``).
        n: Number of paired items.
        value_a: Metric for model A (e.g. the base model).
        value_b: Metric for model B (e.g. the aligned model).
        delta: ``value_b - value_a``; positive means B scores higher.
        ci_low: Lower end of the paired percentile-bootstrap confidence
            interval for ``delta`` (95 % by default).
        ci_high: Upper end of that interval.
        p_value: Two-sided p-value for "no difference": a paired permutation
            test (``test == "permutation"``), an exact McNemar test for 0/1
            items (``test == "mcnemar"``), or 1.0 when the two score vectors
            are identical (``test == "identical"``).
        test: Which test produced ``p_value``.
        effect_size: ``"cohens_dz"`` -- mean per-item difference divided by
            the standard deviation of the per-item differences (continuous
            items); ``"log_odds_ratio"`` -- the natural log of McNemar's
            conditional odds ratio ``n01 / n10`` (binary items; positive means
            B is 1 where A is 0 more often than the reverse).  0.0 when the
            models never differ.
        effect_size_kind: ``"cohens_dz"``, ``"log_odds_ratio"`` or ``"none"``.
        p_adjusted: Holm-adjusted p-value, set by :func:`holm`; ``None`` until
            then.
    """

    metric: str
    n: int
    value_a: float
    value_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    effect_size: float
    effect_size_kind: str
    p_adjusted: float | None = None

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the difference is significant at ``alpha``.

        Uses the Holm-adjusted p-value when :func:`holm` has been applied (so
        a family of metrics is judged with family-wise error control) and the
        raw p-value otherwise.  Identical vectors are never significant.
        """
        if self.test == "identical":
            return False
        p = self.p_adjusted if self.p_adjusted is not None else self.p_value
        return bool(p < alpha)


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _as_scores(x: Any, which: str) -> np.ndarray:
    """Convert one model's scores to a 1-D float array, or raise InputError."""
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"model {which} scores are not numeric ({exc}); each item score must be a "
            "number (or 0/1 for binary outcomes)"
        ) from None
    if arr.ndim != 1:
        raise InputError(
            f"model {which} scores must be a flat list of per-item numbers, got an array "
            f"of shape {arr.shape}"
        )
    return arr


def _validate_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check that A and B are paired, non-empty, finite score vectors."""
    xa = _as_scores(a, "A")
    xb = _as_scores(b, "B")
    if xa.size == 0 or xb.size == 0:
        empty = " and ".join(w for w, x in (("A", xa), ("B", xb)) if x.size == 0)
        raise InputError(
            f"model {empty} has no scored items; nothing to compare "
            "(check that the audit produced scores for this metric)"
        )
    if xa.size != xb.size:
        raise InputError(
            f"model A has {xa.size} items, model B has {xb.size}; "
            "compare on the same item set or pass --intersect"
        )
    for which, x in (("A", xa), ("B", xb)):
        nan = np.isnan(x)
        if nan.any():
            raise InputError(
                f"model {which} has {int(nan.sum())} NaN score(s) out of {x.size} items "
                f"(first at index {int(np.flatnonzero(nan)[0])}); drop or re-score those "
                "items before comparing"
            )
        inf = np.isinf(x)
        if inf.any():
            raise InputError(
                f"model {which} has {int(inf.sum())} infinite score(s) out of {x.size} "
                f"items (first at index {int(np.flatnonzero(inf)[0])}); scores must be "
                "finite numbers"
            )
    return xa, xb


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0.0) | (x == 1.0)))


def _block_rows(n: int) -> int:
    """Rows per block so that a ``(rows, n)`` array stays under the memory cap."""
    return max(1, _MAX_BLOCK_ELEMENTS // max(n, 1))


def _call_statistic(statistic: Statistic, x: np.ndarray) -> float:
    return float(statistic(x))


# --------------------------------------------------------------------------- #
# bootstrap
# --------------------------------------------------------------------------- #
def _bootstrap_mean_diff(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of ``mean(d)`` as matrix ops (blocked for memory).

    For the mean, ``mean(b[idx]) - mean(a[idx]) == mean(d[idx])`` with
    ``d = b - a``, so resampling the per-item differences *is* the paired
    bootstrap (the same indices for A and B).
    """
    n = d.size
    reps = np.empty(n_boot, dtype=float)
    rows = _block_rows(n)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        reps[start : start + k] = d[idx].mean(axis=1)
    return reps


def _bootstrap_statistic(
    xa: np.ndarray, xb: np.ndarray, statistic: Statistic, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap replicates of ``f(b) - f(a)`` for a general statistic.

    The statistic is an arbitrary Python callable, so it is called per
    resample; the indices are still drawn as one matrix and shared by A and B.
    """
    n = xa.size
    reps = np.empty(n_boot, dtype=float)
    rows = _block_rows(n)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        for j in range(k):
            ii = idx[j]
            reps[start + j] = _call_statistic(statistic, xb[ii]) - _call_statistic(
                statistic, xa[ii]
            )
    return reps


def _percentile_ci(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the bootstrap replicates.

    Non-finite replicates (e.g. a ratio whose denominator resampled to zero)
    are dropped; if none are left the interval is ``(nan, nan)``.
    """
    finite = reps[np.isfinite(reps)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
def _count_extreme(perm: np.ndarray, observed: float, scale: float) -> int:
    """Two-sided count of permutation statistics at least as extreme as observed.

    A tiny relative tolerance makes ties that differ only by floating-point
    summation order count as extreme (the conservative choice); NaN
    statistics also count as extreme.
    """
    tol = 1e-9 * max(abs(observed), scale, np.finfo(float).tiny)
    extreme = (np.abs(perm) >= abs(observed) - tol) | np.isnan(perm)
    return int(extreme.sum())


def _permutation_mean(d: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Sign-flip test of ``mean(d) == 0`` (vectorised; blocked for memory).

    Swapping A and B on an item negates its difference, so a random swap
    pattern is a random sign vector; the permuted means are ``signs @ d / n``.
    """
    n = d.size
    observed = float(d.mean())
    scale = float(np.abs(d).mean())
    extreme = 0
    rows = _block_rows(n)
    for start in range(0, n_perm, rows):
        k = min(rows, n_perm - start)
        flips = rng.integers(0, 2, size=(k, n), dtype=np.int8)
        signs = 1.0 - 2.0 * flips
        perm = signs @ d / n
        extreme += _count_extreme(perm, observed, scale)
    return (1.0 + extreme) / (1.0 + n_perm)


def _permutation_statistic(
    xa: np.ndarray,
    xb: np.ndarray,
    statistic: Statistic,
    observed: float,
    n_perm: int,
    rng: np.random.Generator,
) -> float:
    """Within-item swap test for a general statistic ``f(b) - f(a)``.

    Under the null the pair labels are exchangeable within each item, and
    swapping every pair negates the statistic, so the permutation
    distribution is symmetric about 0 and ``|T*| >= |T|`` is the two-sided
    criterion.
    """
    n = xa.size
    scale = abs(observed)
    extreme = 0
    rows = _block_rows(n)
    for start in range(0, n_perm, rows):
        k = min(rows, n_perm - start)
        swaps = rng.integers(0, 2, size=(k, n), dtype=np.int8).astype(bool)
        perm = np.empty(k, dtype=float)
        for j in range(k):
            s = swaps[j]
            pa = np.where(s, xb, xa)
            pb = np.where(s, xa, xb)
            perm[j] = _call_statistic(statistic, pb) - _call_statistic(statistic, pa)
        extreme += _count_extreme(perm, observed, scale)
    return (1.0 + extreme) / (1.0 + n_perm)


def _mcnemar(xa: np.ndarray, xb: np.ndarray) -> tuple[float, float]:
    """Exact McNemar test and log conditional odds ratio for 0/1 pairs.

    Only discordant items carry information about a difference between the
    models: ``n01`` items where A is 0 and B is 1, ``n10`` the reverse.  Under
    the null each discordant item is equally likely to go either way, so
    ``n01 ~ Binomial(n01 + n10, 1/2)``; the exact two-sided binomial test is
    used rather than the chi-square approximation because audit item sets are
    often small and discordant counts smaller still.

    The effect size is ``log(n01 / n10)``, the log of the conditional
    (matched-pairs) odds ratio.  When one of the two counts is zero, 0.5 is
    added to both (Haldane-Anscombe correction) to keep it finite.  With no
    discordant items the p-value is 1 and the effect size 0.
    """
    n01 = int(np.count_nonzero((xa == 0.0) & (xb == 1.0)))
    n10 = int(np.count_nonzero((xa == 1.0) & (xb == 0.0)))
    discordant = n01 + n10
    if discordant == 0:
        return 1.0, 0.0
    p = float(binomtest(n01, discordant, 0.5, alternative="two-sided").pvalue)
    c01, c10 = float(n01), float(n10)
    if n01 == 0 or n10 == 0:
        c01 += 0.5
        c10 += 0.5
    return min(1.0, p), math.log(c01 / c10)


def _cohens_dz(d: np.ndarray) -> float:
    """Cohen's d_z: mean per-item difference over the SD (ddof=1) of differences.

    0.0 when there are no differences; ``nan`` with a single item (no SD);
    ``+/-inf`` when every item moved by the same non-zero amount (a perfectly
    consistent shift has zero spread).
    """
    mean = float(d.mean())
    if np.all(d == 0.0):
        return 0.0
    if d.size < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return math.copysign(math.inf, mean)
    return mean / sd


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def compare_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    metric: str = "mean",
    statistic: Statistic | None = None,
    binary: bool | None = None,
    n_boot: int = 2000,
    n_perm: int = 5000,
    seed: int | None = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare model A and model B on one metric over the same items.

    ``a[i]`` and ``b[i]`` must be the two models' scores on the *same* item
    (use :func:`align_items` to pair items by id first).

    Args:
        a: Per-item scores of model A (e.g. the base model).
        b: Per-item scores of model B (e.g. the aligned model).
        metric: Label for the result.
        statistic: ``f(x) -> float`` applied to each model's item vector to
            get the metric; default the mean.  Any aggregate works (a
            percentage, a trimmed mean, a ratio of two sums over items ...).
            The mean takes fully vectorised fast paths; a general statistic is
            called once per resample.
        binary: Treat items as 0/1 outcomes (use McNemar).  ``None`` detects
            it: binary when both vectors hold only 0 and 1.  Pass ``False`` to
            force the permutation test on 0/1 data.
        n_boot: Bootstrap resamples for the confidence interval.
        n_perm: Random within-item swaps for the permutation test; the
            smallest attainable p-value is ``1 / (1 + n_perm)``.
        seed: Seed for ``numpy.random.default_rng``; the same seed and inputs
            give the same result.
        confidence: Confidence level of the interval.

    Returns:
        A :class:`PairedComparison`.

    Method:
        *Confidence interval* -- paired percentile bootstrap: resample item
        indices with replacement (the same indices for A and B), recompute
        ``f(b) - f(a)``, and take the ``(1 - confidence)/2`` and
        ``(1 + confidence)/2`` quantiles.  The percentile interval is chosen
        because it needs no normality or variance formula (so it works for
        any ``statistic``), respects the metric's range (a difference of
        rates stays within [-1, 1]), and is transformation-respecting.  Its
        known weakness is slight under-coverage for very small n; audits
        typically have dozens to thousands of items.

        *p-value* -- for continuous items a two-sided paired permutation test:
        under "A and B are interchangeable" each item's pair may be swapped,
        which for the mean is a random sign flip of the per-item difference;
        ``p = (1 + #{|T*| >= |T|}) / (1 + n_perm)`` (the +1 keeps a Monte
        Carlo p-value valid, never 0).  For binary items an exact McNemar
        test.  With 0/1 data any permutation-invariant statistic is a
        function of the proportion of 1s, which is what McNemar tests.

        *Identical vectors* short-circuit: delta 0, CI [0, 0], p = 1,
        ``test == "identical"``.

    Raises:
        InputError: Different lengths, empty vectors, NaN or infinite scores,
            non-0/1 scores with ``binary=True``, a statistic that returns a
            non-finite value on the observed data, or invalid settings.
    """
    xa, xb = _validate_pair(a, b)
    n = int(xa.size)
    if int(n_boot) < 1 or int(n_perm) < 1:
        raise InputError(
            f"n_boot and n_perm must be at least 1 (got n_boot={n_boot}, n_perm={n_perm})"
        )
    n_boot, n_perm = int(n_boot), int(n_perm)
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be between 0 and 1 (got {confidence})")

    use_mean = statistic is None or statistic is np.mean
    if use_mean:
        value_a, value_b = float(xa.mean()), float(xb.mean())
    else:
        assert statistic is not None
        value_a = _call_statistic(statistic, xa)
        value_b = _call_statistic(statistic, xb)
        for which, v in (("A", value_a), ("B", value_b)):
            if not math.isfinite(v):
                raise InputError(
                    f"metric {metric!r} is {v} for model {which}; the statistic must "
                    "return a finite number on the observed items"
                )
    delta = value_b - value_a

    both_binary = _is_binary(xa) and _is_binary(xb)
    if binary is None:
        binary = both_binary
    elif binary and not both_binary:
        which = "A" if not _is_binary(xa) else "B"
        bad = xa if which == "A" else xb
        first = int(np.flatnonzero((bad != 0.0) & (bad != 1.0))[0])
        raise InputError(
            f"binary=True but model {which} has a score other than 0/1 "
            f"({bad[first]!r} at index {first}); binary outcomes must be 0 or 1"
        )

    d = xb - xa
    if np.array_equal(xa, xb):
        return PairedComparison(
            metric=metric,
            n=n,
            value_a=value_a,
            value_b=value_b,
            delta=0.0,
            ci_low=0.0,
            ci_high=0.0,
            p_value=1.0,
            test="identical",
            effect_size=0.0,
            effect_size_kind="none",
        )

    rng = np.random.default_rng(seed)
    if use_mean:
        reps = _bootstrap_mean_diff(d, n_boot, rng)
    else:
        assert statistic is not None
        reps = _bootstrap_statistic(xa, xb, statistic, n_boot, rng)
    ci_low, ci_high = _percentile_ci(reps, confidence)

    if binary:
        p_value, effect = _mcnemar(xa, xb)
        test, kind = "mcnemar", "log_odds_ratio"
    else:
        if use_mean:
            p_value = _permutation_mean(d, n_perm, rng)
        else:
            assert statistic is not None
            p_value = _permutation_statistic(xa, xb, statistic, delta, n_perm, rng)
        effect = _cohens_dz(d)
        test, kind = "permutation", "cohens_dz"

    return PairedComparison(
        metric=metric,
        n=n,
        value_a=value_a,
        value_b=value_b,
        delta=delta,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=float(p_value),
        test=test,
        effect_size=float(effect),
        effect_size_kind=kind,
    )


def holm(
    comparisons: Sequence[PairedComparison], alpha: float = 0.05
) -> list[PairedComparison]:
    """Holm-Bonferroni step-down adjustment over a family of comparisons.

    Returns copies (in the input order) with ``p_adjusted`` set to
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))`` for the i-th smallest
    p-value out of m.  The adjusted values are monotone in the raw p-values
    and capped at 1, and ``p_adjusted <= alpha`` is exactly the set of
    hypotheses Holm's procedure rejects at level ``alpha`` (compare the
    sorted p-values with ``alpha / m, alpha / (m - 1), ...`` and stop at the
    first that fails).

    Holm controls the family-wise error rate under *any* dependence between
    the tests -- metrics computed on the same items are correlated -- and
    rejects everything Bonferroni rejects, and often more.

    Args:
        comparisons: The family, e.g. every metric of one audit.
        alpha: Family-wise error rate.  Only validated here: the adjusted
            p-values do not depend on it; use
            ``PairedComparison.significant(alpha)`` to read off decisions.

    Raises:
        InputError: ``alpha`` outside (0, 1) or a p-value outside [0, 1].
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be between 0 and 1 (got {alpha})")
    m = len(comparisons)
    if m == 0:
        return []
    p = np.array([c.p_value for c in comparisons], dtype=float)
    bad = ~((p >= 0.0) & (p <= 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"p-value of metric {comparisons[i].metric!r} is {p[i]}; p-values must lie in [0, 1]"
        )
    order = np.argsort(p, kind="stable")
    factors = m - np.arange(m)  # m, m-1, ..., 1
    stepped = np.minimum(1.0, np.maximum.accumulate(factors * p[order]))
    adjusted = np.empty(m, dtype=float)
    adjusted[order] = stepped
    return [replace(c, p_adjusted=float(adj)) for c, adj in zip(comparisons, adjusted)]


def _preview(ids: list[Hashable], k: int = 3) -> str:
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (", ..." if len(ids) > k else "")


def align_items(
    ids_a: Sequence[Hashable], ids_b: Sequence[Hashable], intersect: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Pair two models' items by id.

    Returns index arrays ``(idx_a, idx_b)`` such that ``ids_a[idx_a[k]] ==
    ids_b[idx_b[k]]`` for every k, in model A's order (stable, so reports list
    items in the order the audit produced them).  Use them as
    ``compare_paired(a[idx_a], b[idx_b])``.

    Pairing by id rather than by position matters because one model's run
    may have skipped or reordered items; comparing position i with position i
    would then silently compare different prompts.

    Args:
        ids_a: Item ids in the order of model A's scores.
        ids_b: Item ids in the order of model B's scores.
        intersect: If the id sets differ, keep only the common ids instead of
            failing.

    Raises:
        InputError: Duplicate ids in either model; different id sets without
            ``intersect``; no ids in common.
    """
    la, lb = list(ids_a), list(ids_b)
    pos_b: dict[Hashable, int] = {}
    for which, ids in (("A", la), ("B", lb)):
        seen: dict[Hashable, int] = {}
        dups: list[Hashable] = []
        for i, item in enumerate(ids):
            if item in seen:
                if item not in dups:
                    dups.append(item)
            else:
                seen[item] = i
        if dups:
            raise InputError(
                f"model {which} has {len(dups)} duplicate item id(s) ({_preview(dups)}); "
                "each item id must appear once per model"
            )
        if which == "B":
            pos_b = seen

    set_a = set(la)
    only_a = [i for i in la if i not in pos_b]
    only_b = [i for i in lb if i not in set_a]
    if (only_a or only_b) and not intersect:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in model A (e.g. {_preview(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} only in model B (e.g. {_preview(only_b)})")
        raise InputError(
            "the two models were scored on different items: "
            + "; ".join(parts)
            + "; compare on the same item set or pass --intersect"
        )
    idx_a = np.array([i for i, item in enumerate(la) if item in pos_b], dtype=np.intp)
    idx_b = np.array([pos_b[la[i]] for i in idx_a], dtype=np.intp)
    if idx_a.size == 0:
        raise InputError(
            f"the two models have no item ids in common (model A: {len(la)} ids, "
            f"model B: {len(lb)} ids); check that both runs used the same dataset"
        )
    return idx_a, idx_b
