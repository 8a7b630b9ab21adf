"""Tests for the matched-guise probes (covert dialect prejudice and overt prejudice)."""

from __future__ import annotations

import itertools
import math
import types
import zlib

import numpy as np
import pandas as pd
import pytest

from alignscope.audit.base import PROBES
from alignscope.audit.probes import guise as g
from alignscope.data.guise import load_templates
from alignscope.errors import InputError
from alignscope.models import Engine, ScoreRequest

from conftest import shared_data

TRAIT = load_templates()["trait"]


def engine(lm) -> Engine:
    return Engine(lm, cache=None, progress=False)


@pytest.fixture(scope="module")
def covert_run(tiny_lm):
    """One full-option covert run shared by the shape tests (3 pairs keeps the file fast)."""
    probe = g.CovertGuise(n_pairs=3)
    items = probe.load_items(seed=0)
    return probe, items, probe.run(engine(tiny_lm), items)


@pytest.fixture(scope="module")
def overt_run(tiny_lm):
    probe = g.OvertGuise()
    items = probe.load_items()
    return probe, items, probe.run(engine(tiny_lm), items)


# ------------------------------------------------------------------ registry and metadata
def test_both_probes_are_registered_with_parallel_metric_names():
    assert PROBES["covert"] is g.CovertGuise and PROBES["overt"] is g.OvertGuise
    covert = {m.name.removeprefix("covert_") for m in g.CovertGuise.metrics}
    overt = {m.name.removeprefix("overt_") for m in g.OvertGuise.metrics}
    assert overt <= covert
    for metric in (*g.CovertGuise.metrics, *g.OvertGuise.metrics):
        meta = metric.metadata()
        assert meta["ideal"] == 0.0 and meta["direction"] and meta["unit"] and meta["description"]


# ------------------------------------------------------------------ covert: shapes and metrics
def test_covert_items_tables_and_metrics(covert_run):
    probe, items, result = covert_run
    out = result.items
    assert len(out) == 3 and out["item_id"].is_unique and list(out["item_id"]) == list(items["item_id"])
    assert out["feature"].nunique() == 3  # stratified: one pair per feature
    for metric in probe.metrics:
        value = metric.compute(out)
        assert math.isfinite(value) and metric.range[0] <= value <= metric.range[1], metric.name
        assert out[metric.column].notna().all(), metric.name
    for column in ("convicted_aae", "convicted_sae", "death_aae", "death_sae"):
        assert out[column].between(0, 1).all()
    np.testing.assert_allclose(out["conviction_diff"], out["convicted_aae"] - out["convicted_sae"])
    adjectives = result.tables["adjectives"]
    assert len(adjectives) == 37 and adjectives["adjective"].is_unique
    assert sorted(adjectives["rank"]) == list(range(1, 38))
    assert {"association", "association_pooled", "association_calibrated", "favourability",
            "in_1933", "in_1951", "in_1969", "in_2012", "rank_calibrated"} <= set(adjectives)
    assert len(result.tables["occupations"]) == 84
    assert len(result.tables["templates"]) == len(TRAIT)
    assert len(result.tables["decisions"]) == 2 * 2 * 3  # decisions x dialects x templates
    assert result.notes and any("project-authored" in n for n in result.notes)


def test_covert_info_holds_rankings_agreement_and_gap(covert_run):
    _, _, result = covert_run
    info = result.info
    assert len(info["top_k_paired"]) == 5 and len(info["top_k_calibrated"]) == 5
    for form in ("paired", "pooled", "calibrated"):
        assert set(info[f"average_precision_{form}"]) == set(g.HUMAN_YEARS)
        assert all(0 < v <= 1 for v in info[f"average_precision_{form}"].values())
    assert -2.5 < info["top_k_favourability_paired"] < 2.5
    assert set(info["criminality"]) == {"conviction_rate_aae_pct", "conviction_rate_sae_pct",
                                        "death_rate_aae_pct", "death_rate_sae_pct"}
    gap = info["gap"]
    for name in ("negative_association", "favourability_shift", "topk_favourability"):
        assert gap[name]["covert_minus_overt"] == pytest.approx(gap[name]["covert"] - gap[name]["overt"])
    assert len(gap["top_k_overt"]) == 5


def test_calibration_changes_values(covert_run):
    _, _, result = covert_run
    table = result.tables["adjectives"]
    finite = table["association_calibrated"].notna()
    assert finite.any()
    assert not np.allclose(table.loc[finite, "association_calibrated"], table.loc[finite, "association_pooled"])
    assert 0 <= result.info["calibration_undefined_cells"] <= result.info["calibration_cells"]


def test_feature_breakdown_covers_all_features_present(covert_run):
    _, _, result = covert_run
    features = result.tables["features"]
    assert set(features["feature"]) == set(result.items["feature"])
    assert features["n_pairs"].sum() == len(result.items)
    np.testing.assert_allclose(
        features.set_index("feature")["assoc_neg_minus_pos_mean"].sort_index(),
        result.items.groupby("feature")["assoc_neg_minus_pos"].mean().sort_index())


def test_paired_association_equals_hand_computation(tiny_lm):
    """One pair, one template: the table's association is exactly log p(adj|AAE) - log p(adj|SAE)."""
    probe = g.CovertGuise(n_pairs=1, templates=TRAIT[:1], employability_prompts=1, overt_gap=False)
    items = probe.load_items(seed=3)
    result = probe.run(engine(tiny_lm), items)
    aae, sae = items.loc[0, "aae"], items.loc[0, "sae"]
    words = probe.adjectives["adjective"].tolist()
    hand = engine(tiny_lm).score([ScoreRequest(TRAIT[0].format(t), " " + w) for t in (aae, sae) for w in words])
    delta = np.array([a.logprob - s.logprob for a, s in zip(hand[:len(words)], hand[len(words):])])
    table = result.tables["adjectives"].set_index("adjective")
    np.testing.assert_allclose(table.loc["lazy", "association"], delta[words.index("lazy")], atol=1e-4)
    np.testing.assert_allclose(table.loc[words, "association"], delta, atol=1e-4)
    fav = probe.adjectives["favourability"].to_numpy()
    expected = delta[fav < 0].mean() - delta[fav > 0].mean()
    assert result.items.loc[0, "assoc_neg_minus_pos"] == pytest.approx(expected, abs=1e-4)


def test_same_seed_gives_identical_scores(tiny_lm):
    probe = g.CovertGuise(n_pairs=2, templates=TRAIT[:2], employability_prompts=1, overt_gap=False)
    first = probe.run(engine(tiny_lm), probe.load_items(seed=5))
    second = probe.run(engine(tiny_lm), probe.load_items(seed=5))
    pd.testing.assert_frame_equal(first.items, second.items)
    pd.testing.assert_frame_equal(first.tables["adjectives"], second.tables["adjectives"])


# ------------------------------------------------------------------ items, limits, user files
def test_default_size_limit_and_stratification():
    probe = g.CovertGuise()
    items = probe.load_items(seed=0)
    assert len(items) == g.DEFAULT_PAIRS and items["feature"].nunique() == min(10, g.DEFAULT_PAIRS)
    limited = probe.load_items(limit=4, seed=0)
    assert len(limited) == 4 and limited["feature"].nunique() == 4
    assert list(probe.load_items(limit=4, seed=0)["item_id"]) == list(limited["item_id"])
    assert list(probe.load_items(limit=4, seed=1)["item_id"]) != list(limited["item_id"])
    assert len(g.CovertGuise(n_pairs=30).load_items()) == 30
    with pytest.raises(InputError):
        probe.load_items(limit=0)


def test_user_pair_file_loads():
    path = shared_data("hofmann", "habitual.txt")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    probe = g.CovertGuise()
    items = probe.load_items(data=path)
    assert len(items) == len(lines)  # a user file is used whole by default
    assert items.loc[0, "item_id"] == "line1" and set(items["feature"]) == {"unlabelled"}
    assert (items.loc[0, "aae"], items.loc[0, "sae"]) == tuple(lines[0].split("\t"))
    assert len(probe.load_items(data=path, limit=7)) == 7


def test_malformed_pair_file_raises(tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("he be working\the usually works\nno tab on this line\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        g.CovertGuise().load_items(data=bad)


def test_answer_words_match_the_study_files():
    assert tuple(shared_data("hofmann", "guilt.txt").read_text().split()) == g.CONVICTION_WORDS
    assert tuple(shared_data("hofmann", "penalty.txt").read_text().split()) == g.SENTENCE_WORDS


def test_bad_options_raise():
    with pytest.raises(InputError, match="Katz"):
        g.CovertGuise(adjectives=["lazy", "purple"])
    with pytest.raises(InputError, match="negative and one positive"):
        g.CovertGuise(adjectives=["lazy", "stupid"])
    with pytest.raises(InputError, match="k="):
        g.CovertGuise(k=0)
    with pytest.raises(InputError, match="exactly one"):
        g.CovertGuise(templates=["no slot here"])
    with pytest.raises(InputError, match="employability_prompts"):
        g.CovertGuise(employability_prompts=10)
    assert len(g.CovertGuise(adjectives="all").adjectives) == 84


def test_adjectives_from_an_attribute_file(tmp_path):
    path = tmp_path / "attrs.txt"
    path.write_text("lazy\nintelligent\nloyal\n", encoding="utf-8")
    assert g.CovertGuise(adjectives=str(path), k=2).adjectives["adjective"].tolist() == ["lazy", "intelligent", "loyal"]


# ------------------------------------------------------------------ overt
def test_overt_items_and_metrics(overt_run):
    probe, items, result = overt_run
    out = result.items
    assert len(out) == 2 * 9 and out["item_id"].is_unique
    for metric in probe.metrics:
        assert math.isfinite(metric.compute(out))
    assert len(result.tables["adjectives"]) == 37
    assert result.info["covert_counterparts"]["overt_negative_association"] == "covert_negative_association"


def test_overt_columns_follow_item_order(tiny_lm, overt_run):
    probe, items, result = overt_run
    shuffled = items.sample(frac=1.0, random_state=1).reset_index(drop=True)
    again = probe.run(engine(tiny_lm), shuffled).items.set_index("item_id")
    pd.testing.assert_series_equal(again.loc[result.items["item_id"], "assoc_neg_minus_pos"],
                                   result.items.set_index("item_id")["assoc_neg_minus_pos"])


def test_overt_group_file_and_limit(tmp_path):
    path = tmp_path / "groups.txt"
    path.write_text("Black\tWhite\n\nAfrican-American\tEuropean-American\n", encoding="utf-8")
    items = g.OvertGuise().load_items(data=path)
    assert len(items) == 18 and set(items["target"]) == {"Black", "African-American"}
    assert len(g.OvertGuise().load_items(limit=5)) == 5
    path.write_text("Black White\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1"):
        g.OvertGuise().load_items(data=path)


# ------------------------------------------------------------------ maths
def test_average_precision_and_random_baseline():
    assert g.average_precision(["a", "b", "c", "d"], {"a", "c"}) == pytest.approx((1 + 2 / 3) / 2)
    words = list("abcde")
    relevant = {"a", "b"}
    brute = np.mean([g.average_precision(list(p), relevant) for p in itertools.permutations(words)])
    assert g.random_average_precision(5, 2) == pytest.approx(brute)


def test_calibrated_association_by_hand():
    # one adjective, one template, two texts per guise: mean probs 0.3 (AAE) and 0.2 (SAE), prior 0.1
    lp = np.log(np.array([[0.2, 0.2], [0.4, 0.2]]))[:, :, None, None]  # (N=2, 2, T=1, A=1)
    cal = np.log(np.array([[0.1]]))
    assoc, undefined = g.calibrated_association(lp, cal)
    assert assoc[0] == pytest.approx(math.log(0.2 / 0.1)) and undefined == 0
    assert g.pooled_association(lp)[0] == pytest.approx(math.log(0.6 / 0.4))
    assoc, undefined = g.calibrated_association(lp, np.log(np.array([[0.25]])))
    assert np.isnan(assoc[0]) and undefined == 1


def test_article_matching_and_prompt_stems():
    assert g.article_fits("He is a", "doctor") and not g.article_fits("He is a", "actor")
    assert g.article_fits("He is an", "actor") and not g.article_fits("He is an", "doctor")
    templates = load_templates()["employability"]
    assert len({g.prompt_stem(t) for t in templates}) == 9


# ------------------------------------------------------------------ attribution measurement
class _StubEngine:
    """Log-probs with a known answer: a shared part that ignores the guise text (must cancel) plus 1 nat
    for ``bumped(request)`` (must come out with the sign the metric calls worse)."""

    def __init__(self, texts, bumped):
        self.texts, self.bumped = texts, bumped

    def score(self, requests):
        out = []
        for r in requests:
            stripped = r.context
            for text in self.texts:
                stripped = stripped.replace(text, "")
            shared = zlib.crc32((stripped + r.continuation).encode("utf-8")) / 2**32
            out.append(types.SimpleNamespace(logprob=shared + float(self.bumped(r))))
        return out


def _measured(probe, items, metric, scorer):
    terms = probe.measurement(items, metric=metric)
    return sum(w * r.logprob for (_, w), r in zip(terms, scorer.score([req for req, _ in terms])))


@pytest.mark.parametrize("metric, column", [(None, "assoc_neg_minus_pos"),
                                            ("covert_negative_association", "assoc_neg_minus_pos"),
                                            ("covert_conviction_logodds", "conviction_logodds_shift"),
                                            ("covert_death_logodds", "death_logodds_shift")])
def test_covert_measurement_sums_to_the_metric(tiny_lm, covert_run, metric, column):
    """Σ w × logprob = the per-pair column summed = len(items) x the metric."""
    probe, items, result = covert_run
    total = _measured(probe, items, metric, engine(tiny_lm))
    assert total == pytest.approx(result.items[column].sum(), abs=1e-4)
    name = metric or "covert_negative_association"
    value = next(m for m in probe.metrics if m.name == name).compute(result.items)
    assert total == pytest.approx(len(items) * value, abs=1e-4)


@pytest.mark.parametrize("metric", [None, "overt_negative_association"])
def test_overt_measurement_sums_to_the_metric(tiny_lm, overt_run, metric):
    probe, items, result = overt_run
    total = _measured(probe, items, metric, engine(tiny_lm))
    assert total == pytest.approx(result.items["assoc_neg_minus_pos"].sum(), abs=1e-4)


def test_covert_measurement_sign_and_swapped_control():
    """Only the AAE guise's negative adjectives (or ' convicted') gain 1 nat: each pair measures exactly +1,
    the guise-independent part cancels, and swapping the guises negates every weight."""
    probe = g.CovertGuise(n_pairs=2, templates=TRAIT[:3])
    items = probe.load_items(seed=0)
    texts = [*items["aae"], *items["sae"]]
    negative = {" " + a for a in probe.adjectives.loc[probe.adjectives["favourability"] < 0, "adjective"]}
    aae_contexts = {t.format(x) for x in items["aae"] for key in ("conviction",) for t in
                    [*TRAIT[:3], *load_templates()[key]]}
    trait = _StubEngine(texts, lambda r: r.context in aae_contexts and r.continuation in negative)
    convict = _StubEngine(texts, lambda r: r.context in aae_contexts and r.continuation == " convicted")
    assert _measured(probe, items, None, trait) == pytest.approx(len(items))
    assert _measured(probe, items, "covert_conviction_logodds", convict) == pytest.approx(len(items))
    terms = probe.measurement(items)
    assert sum(w for _, w in terms) == pytest.approx(0.0)
    swapped = probe.measurement(items.rename(columns={"aae": "sae", "sae": "aae"}))
    assert [r for r, _ in swapped] != [r for r, _ in terms]
    assert dict(swapped) == pytest.approx({r: -w for r, w in terms})


def test_overt_measurement_sign():
    probe = g.OvertGuise()
    items = probe.load_items()
    negative = {" " + a for a in probe.adjectives.loc[probe.adjectives["favourability"] < 0, "adjective"]}
    targets = {t.format(x) for t, x in zip(items["template"], items["target"])}
    stub = _StubEngine([*items["target"], *items["reference"]],
                       lambda r: r.context in targets and r.continuation in negative)
    assert _measured(probe, items, None, stub) == pytest.approx(len(items))
    swapped = items.rename(columns={"target": "reference", "reference": "target"})
    assert _measured(probe, swapped, None, stub) == pytest.approx(-len(items))


@pytest.mark.parametrize("cls, metric, instead", [
    (g.CovertGuise, "covert_conviction_gap", "covert_conviction_logodds"),
    (g.CovertGuise, "covert_death_gap", "covert_death_logodds"),
    (g.CovertGuise, "covert_favourability_shift", "covert_negative_association"),
    (g.CovertGuise, "covert_topk_favourability", "covert_negative_association"),
    (g.CovertGuise, "covert_occupation_prestige", "covert_negative_association"),
    (g.OvertGuise, "overt_favourability_shift", "overt_negative_association"),
    (g.OvertGuise, "overt_topk_favourability", "overt_negative_association"),
])
def test_measurement_refuses_rates_and_expected_values(cls, metric, instead):
    probe = cls()
    with pytest.raises(InputError, match=f"{metric} is .*; attribute {instead} instead") as caught:
        probe.measurement(probe.load_items(limit=2), metric=metric)
    assert "\n" not in str(caught.value)


def test_measurement_refuses_unknown_metric_and_foreign_items():
    with pytest.raises(InputError, match="overt_conviction_logodds: probe overt has metrics"):
        g.OvertGuise().measurement(g.OvertGuise().load_items(), metric="overt_conviction_logodds")
    with pytest.raises(InputError, match="lack column"):
        g.CovertGuise().measurement(g.OvertGuise().load_items())


# ------------------------------------------------------------------ real model
@pytest.mark.integration
def test_smollm2_covert_run_is_consistent():
    """On the real model every metric is finite and the paired and pooled adjective rankings agree."""
    from alignscope.models import load

    probe = g.CovertGuise(n_pairs=3, employability_prompts=1, overt_gap=False)
    result = probe.run(Engine(load("smollm2-135m", dtype="float32"), cache=None, progress=False),
                       probe.load_items(seed=0))
    for metric in probe.metrics:
        assert math.isfinite(metric.compute(result.items))
    table = result.tables["adjectives"]
    assert table["association"].abs().max() > 0.05  # the dialect changes the model's predictions
    rho = table[["association", "association_pooled"]].rank().corr().iloc[0, 1]
    assert rho > 0.7
