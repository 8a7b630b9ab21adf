"""Tests for alignscope.audit.stats: paired comparison of two models on the same items."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignscope.audit.stats import PairedComparison, align_items, compare_paired, holm
from alignscope.errors import InputError


def _paired_continuous(rng: np.random.Generator, n: int, shift: float = 0.0):
    """A/B scores sharing a per-item difficulty (so they are correlated)."""
    item = rng.normal(0.0, 1.0, n)
    a = item + rng.normal(0.0, 0.5, n)
    b = item + rng.normal(0.0, 0.5, n) + shift
    return a, b


def _paired_binary(rng: np.random.Generator, n: int):
    """0/1 outcomes with a shared per-item propensity and no model difference."""
    p = rng.beta(0.8, 0.8, n)
    return (rng.random(n) < p).astype(float), (rng.random(n) < p).astype(float)


# --------------------------------------------------------------------------- identical
@pytest.mark.parametrize(
    "scores", [[0.2, 0.5, 0.9, 0.1], [1, 0, 0, 1, 1], [3.0], np.linspace(0, 1, 50)]
)
def test_identical_vectors_are_never_significant(scores):
    r = compare_paired(scores, list(scores))
    assert r.test == "identical"
    assert r.p_value == 1.0
    assert (r.ci_low, r.ci_high) == (0.0, 0.0)
    assert r.delta == 0.0
    assert r.effect_size == 0.0
    assert not r.significant(0.05)
    assert not holm([r])[0].significant(0.05)


# --------------------------------------------------------------------------- null calibration
def test_null_false_positive_rate_continuous():
    # 1000 datasets (not 300) so the +/- 2 SE band of the rate, about 0.014, fits
    # comfortably inside [0.02, 0.09] and the test is not a coin flip at the edge.
    rng = np.random.default_rng(123)
    sims, hits = 1000, 0
    for s in range(sims):
        a, b = _paired_continuous(rng, 60)
        r = compare_paired(a, b, n_boot=50, n_perm=999, seed=s)
        assert r.test == "permutation"
        hits += r.p_value < 0.05
    assert 0.02 <= hits / sims <= 0.09


def test_null_false_positive_rate_binary_mcnemar():
    rng = np.random.default_rng(456)
    sims, hits = 1000, 0
    for s in range(sims):
        a, b = _paired_binary(rng, 60)
        r = compare_paired(a, b, n_boot=50, seed=s)
        assert r.test in ("mcnemar", "identical")
        hits += r.p_value < 0.05
    assert hits / sims <= 0.07  # exact McNemar is conservative


# --------------------------------------------------------------------------- power and coverage
def test_real_shift_is_detected_and_ci_covers_truth():
    rng = np.random.default_rng(7)
    n = 100
    sd_diff = 0.5 * math.sqrt(2.0)  # sd of b - a in _paired_continuous
    true_delta = 0.5 * sd_diff
    a, b = _paired_continuous(rng, n, shift=true_delta)
    r = compare_paired(a, b)
    assert r.test == "permutation"
    assert r.p_value < 0.01
    assert r.significant(0.01)
    assert r.ci_low < true_delta < r.ci_high
    assert r.ci_low > 0
    assert r.delta == pytest.approx(b.mean() - a.mean())
    d = b - a
    assert r.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    assert r.effect_size_kind == "cohens_dz"


def test_bootstrap_ci_coverage_is_near_nominal():
    rng = np.random.default_rng(11)
    true_delta, sims, covered = 0.3, 400, 0
    for s in range(sims):
        a, b = _paired_continuous(rng, 60, shift=true_delta)
        r = compare_paired(a, b, n_boot=1000, n_perm=1, seed=s)
        covered += r.ci_low <= true_delta <= r.ci_high
    assert 0.88 <= covered / sims <= 0.99


def test_large_item_set_uses_blocked_vectorised_path():
    rng = np.random.default_rng(3)
    a, b = _paired_continuous(rng, 5000, shift=0.05)
    r = compare_paired(a, b, n_boot=2000, n_perm=2000)
    assert r.ci_low < r.delta < r.ci_high
    # the bootstrap SE of a mean difference is ~ sd(d) / sqrt(n)
    se = (b - a).std(ddof=1) / math.sqrt(5000)
    assert (r.ci_high - r.ci_low) == pytest.approx(2 * 1.96 * se, rel=0.15)


# --------------------------------------------------------------------------- McNemar
def _table(n00: int, n01: int, n10: int, n11: int):
    a = [0] * n00 + [0] * n01 + [1] * n10 + [1] * n11
    b = [0] * n00 + [1] * n01 + [0] * n10 + [1] * n11
    return a, b


def test_mcnemar_matches_hand_computation():
    # discordant: n01 = 2 (B is 1, A is 0), n10 = 8.  Exact two-sided binomial:
    # 2 * P(X <= 2 | n=10, p=1/2) = 2 * (1 + 10 + 45) / 1024 = 112 / 1024
    a, b = _table(5, 2, 8, 5)
    r = compare_paired(a, b, metric="stereotype_rate")
    assert r.test == "mcnemar"
    assert r.p_value == pytest.approx(112 / 1024)
    assert r.effect_size_kind == "log_odds_ratio"
    assert r.effect_size == pytest.approx(math.log(2 / 8))
    assert r.n == 20
    assert r.value_a == pytest.approx(13 / 20)
    assert r.value_b == pytest.approx(7 / 20)
    assert r.delta == pytest.approx(-6 / 20)
    assert -1.0 <= r.ci_low <= r.delta <= r.ci_high <= 1.0


def test_mcnemar_zero_cell_uses_haldane_correction():
    # n01 = 0, n10 = 5: p = 2 * (1/2)^5 = 0.0625; log OR = log(0.5 / 5.5)
    a, b = _table(3, 0, 5, 3)
    r = compare_paired(a, b)
    assert r.p_value == pytest.approx(0.0625)
    assert r.effect_size == pytest.approx(math.log(0.5 / 5.5))


def test_binary_override():
    a, b = _table(10, 3, 12, 10)
    forced = compare_paired(a, b, binary=False)
    assert forced.test == "permutation"
    assert forced.effect_size_kind == "cohens_dz"
    assert compare_paired(a, b, binary=True).test == "mcnemar"
    with pytest.raises(InputError, match="other than 0/1"):
        compare_paired([0, 1, 0.5], [0, 1, 1], binary=True)


# --------------------------------------------------------------------------- Holm
def _fake(p: float, name: str = "m") -> PairedComparison:
    return PairedComparison(
        metric=name, n=10, value_a=0.0, value_b=0.0, delta=0.0, ci_low=0.0, ci_high=0.0,
        p_value=p, test="permutation", effect_size=0.0, effect_size_kind="cohens_dz",
    )


def test_holm_matches_hand_worked_example():
    # sorted: 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> max(0.09, 0.08) = 0.09; 0.2*1
    raw = [0.01, 0.04, 0.03, 0.2]
    out = holm([_fake(p, f"m{i}") for i, p in enumerate(raw)], alpha=0.05)
    assert [c.p_adjusted for c in out] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert [c.significant(0.05) for c in out] == [True, False, False, False]
    assert [c.metric for c in out] == ["m0", "m1", "m2", "m3"]  # input order kept
    assert [c.p_value for c in out] == raw  # raw p-values untouched


def test_holm_is_monotone_capped_and_returns_copies():
    rng = np.random.default_rng(5)
    raw = list(rng.uniform(0, 0.6, 25))
    family = [_fake(p) for p in raw]
    out = holm(family)
    assert all(c.p_adjusted is None for c in family)  # originals unchanged
    adj = np.array([c.p_adjusted for c in out])
    order = np.argsort(raw)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= np.array(raw))
    assert np.all(adj <= 1.0)
    assert [c.p_adjusted for c in holm([_fake(0.5), _fake(0.6)])] == [1.0, 1.0]
    assert holm([]) == []
    with pytest.raises(InputError):
        holm([_fake(0.1)], alpha=1.5)


# --------------------------------------------------------------------------- general statistic
def test_percentage_statistic_matches_mean_path():
    rng = np.random.default_rng(9)
    a, b = _paired_continuous(rng, 40, shift=0.2)
    mean = compare_paired(a, b, n_boot=300, n_perm=500, seed=1)
    pct = compare_paired(
        a, b, metric="pct", statistic=lambda x: 100.0 * float(np.mean(x)),
        n_boot=300, n_perm=500, seed=1,
    )
    # same random draws, so the general path reproduces the vectorised one x100
    assert pct.delta == pytest.approx(100 * mean.delta)
    assert pct.ci_low == pytest.approx(100 * mean.ci_low)
    assert pct.ci_high == pytest.approx(100 * mean.ci_high)
    assert pct.p_value == pytest.approx(mean.p_value)
    assert pct.metric == "pct"


def test_general_statistic_threshold_percentage():
    rng = np.random.default_rng(10)
    a = rng.uniform(0, 1, 80)
    b = np.clip(a + 0.3, 0, 1)  # B crosses the 0.5 threshold on many more items

    def pct_above(x: np.ndarray) -> float:
        return 100.0 * float(np.mean(x > 0.5))

    r = compare_paired(a, b, statistic=pct_above, n_boot=500, n_perm=500)
    assert r.value_a == pytest.approx(pct_above(a))
    assert r.value_b == pytest.approx(pct_above(b))
    assert r.delta > 0 and r.ci_low > 0
    assert r.p_value < 0.01


def test_statistic_nonfinite_on_observed_data_is_input_error():
    with pytest.raises(InputError, match="finite"):
        compare_paired([0.0, 0.0], [1.0, 2.0], statistic=lambda x: math.inf if x.sum() == 0 else 1.0 / x.sum())


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_result():
    rng = np.random.default_rng(2)
    a, b = _paired_continuous(rng, 50, shift=0.1)
    r1 = compare_paired(a, b, seed=42)
    r2 = compare_paired(a, b, seed=42)
    assert r1 == r2
    r3 = compare_paired(a, b, seed=43)
    assert (r3.ci_low, r3.ci_high) != (r1.ci_low, r1.ci_high)


# --------------------------------------------------------------------------- input errors
def test_length_mismatch_message():
    with pytest.raises(InputError) as e:
        compare_paired(np.zeros(120), np.zeros(118))
    assert str(e.value) == (
        "model A has 120 items, model B has 118; compare on the same item set or pass --intersect"
    )


def test_empty_vectors():
    with pytest.raises(InputError, match="no scored items"):
        compare_paired([], [])
    with pytest.raises(InputError, match="model B has no scored items"):
        compare_paired([1.0], [])


def test_nan_values_report_count_and_first_index():
    b = [0.1, 0.2, 0.3, math.nan, 0.5, math.nan]
    with pytest.raises(InputError) as e:
        compare_paired([0.0] * 6, b)
    msg = str(e.value)
    assert "model B" in msg and "2 NaN" in msg and "index 3" in msg


def test_other_bad_inputs():
    with pytest.raises(InputError, match="infinite"):
        compare_paired([1.0, math.inf], [1.0, 2.0])
    with pytest.raises(InputError, match="not numeric"):
        compare_paired(["x", "y"], [1.0, 2.0])
    with pytest.raises(InputError, match="flat"):
        compare_paired([[1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(InputError, match="confidence"):
        compare_paired([1.0, 2.0], [2.0, 3.0], confidence=95)


# --------------------------------------------------------------------------- align_items
def test_align_items_same_set_reordered():
    ids_a = ["q1", "q2", "q3", "q4"]
    ids_b = ["q3", "q1", "q4", "q2"]
    ia, ib = align_items(ids_a, ids_b, intersect=False)
    assert [ids_a[i] for i in ia] == ids_a  # model A's order
    assert [ids_b[i] for i in ib] == ids_a


def test_align_items_different_sets_need_intersect():
    ids_a = ["q1", "q2", "q3", "q9"]
    ids_b = ["q2", "q1", "q4", "q5", "q3"]
    with pytest.raises(InputError) as e:
        align_items(ids_a, ids_b, intersect=False)
    msg = str(e.value)
    assert "1 only in model A" in msg and "2 only in model B" in msg and "--intersect" in msg
    ia, ib = align_items(ids_a, ids_b, intersect=True)
    assert [ids_a[i] for i in ia] == ["q1", "q2", "q3"]
    assert [ids_b[i] for i in ib] == ["q1", "q2", "q3"]


def test_align_items_duplicates_and_disjoint():
    with pytest.raises(InputError, match="model B has 1 duplicate"):
        align_items([1, 2, 3], [1, 2, 2, 3], intersect=True)
    with pytest.raises(InputError, match="model A has 1 duplicate"):
        align_items(["a", "a"], ["a"], intersect=True)
    with pytest.raises(InputError, match="no item ids in common"):
        align_items(["a"], ["b"], intersect=True)


def test_align_then_compare():
    ids_a, a = ["x", "y", "z"], np.array([0.1, 0.5, 0.9])
    ids_b, b = ["z", "x", "y"], np.array([0.9, 0.1, 0.5])
    ia, ib = align_items(ids_a, ids_b, intersect=False)
    assert compare_paired(a[ia], b[ib]).test == "identical"
