"""The ethics probe: item table shape and ranges, determinism, limits, parser, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alignscope.audit.base import PROBES
from alignscope.audit.probes.ethics import (
    EVASIVE_SENTENCES, OPTIONS, EthicsProbe, evasive_for, parse_judgement,
)
from alignscope.errors import InputError
from alignscope.models import Engine, ScoreResult
from conftest import shared_data

SMALL = {"n_items": 12, "n_generate": 4, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def tiny_run(tiny_lm):
    probe = EthicsProbe(**SMALL)
    items = probe.load_items(seed=3)
    return probe, items, probe.run(Engine(tiny_lm, cache=None, progress=False), items)


def test_registered_with_metric_metadata():
    assert PROBES["ethics"] is EthicsProbe
    for metric in EthicsProbe.metrics:
        assert metric.direction in {"higher_is_worse", "higher_is_better"} and metric.unit == "%"
        assert metric.range == (0.0, 100.0)
        assert metric.ideal == (100.0 if metric.direction == "higher_is_better" else 0.0)


def test_item_table_shapes_and_ranges(tiny_run):
    probe, items, result = tiny_run
    out = result.items
    assert len(out) == len(items) == 12 and out["item_id"].is_unique
    assert (out["label"] == 1).sum() == 6
    assert set(out["correct"].unique()) <= {0.0, 1.0}
    wrong = out["label"] == 1
    assert out.loc[~wrong, "fn_on_wrong"].isna().all() and out.loc[wrong, "fn_on_wrong"].notna().all()
    assert out.loc[wrong, "fp_on_not_wrong"].isna().all() and out.loc[~wrong, "fp_on_not_wrong"].notna().all()
    assert out.loc[wrong, "fn_on_wrong_evasive"].between(0, 1).all()
    assert out.loc[~wrong, "fn_on_wrong_evasive"].isna().all()
    assert out["option_mass"].between(0, 1).all()
    # the log-prob prediction is the sign of the margin
    assert ((out["logprob_margin"] > 0).astype(float) == out["pred_wrong"]).all()
    gen = out["gen_subset"]
    assert gen.sum() == 4
    assert out.loc[gen, "unparsed"].isin([0.0, 1.0]).all() and out.loc[~gen, "correct_gen"].isna().all()
    assert (out.loc[gen & (out["unparsed"] == 1), "correct_gen"] == 0).all()
    for metric in probe.metrics:
        value = metric.compute(out)
        assert metric.range[0] <= value <= metric.range[1]
    assert len(result.tables["evasive"]) == 6  # one evasive sentence per wrong item by default
    assert result.notes and result.info["options"][0] == "This is wrong."


def test_deterministic_same_seed(tiny_lm, tiny_run):
    probe, items, result = tiny_run
    again = EthicsProbe(**SMALL)
    items2 = again.load_items(seed=3)
    assert items2["item_id"].tolist() == items["item_id"].tolist()
    result2 = again.run(Engine(tiny_lm, cache=None, progress=False), items2)
    cols = ["logprob_margin", "correct", "fn_on_wrong", "fn_on_wrong_evasive", "correct_gen", "unparsed"]
    pd.testing.assert_frame_equal(result.items[cols], result2.items[cols])
    assert result.items["reply"].tolist() == result2.items["reply"].tolist()


def test_limit_is_balanced_and_seeded():
    probe = EthicsProbe()
    a, b = probe.load_items(limit=6, seed=1), probe.load_items(limit=6, seed=1)
    assert a["item_id"].tolist() == b["item_id"].tolist()
    assert len(a) == 6 and (a["label"] == 1).sum() == 3
    assert probe.load_items(seed=2)["item_id"].tolist() != probe.load_items(seed=1)["item_id"].tolist()
    assert len(EthicsProbe(n_items=None).load_items()) == 204


def test_options_are_validated():
    with pytest.raises(InputError, match="unknown option"):
        EthicsProbe(n_itemz=3)
    with pytest.raises(InputError, match="evasive_per_item"):
        EthicsProbe(evasive_per_item=len(EVASIVE_SENTENCES) + 1)
    with pytest.raises(InputError, match="n_generate"):
        EthicsProbe(n_generate=0)


@pytest.mark.parametrize("text, verdict", [
    ("This is wrong. It hurt her.", 1),
    ("This is not wrong. It's fine", 0),
    ("There is nothing wrong with it.", 0),
    ("It isn\u2019t wrong at all", 0),
    ('The answer is "wrong" or "not wrong"', None),
    ("I'm sorry for any confusion", None),
    ("", None),
])
def test_parse_judgement(text, verdict):
    assert parse_judgement(text) == verdict


def test_evasive_rotation_is_stable():
    assert evasive_for("ethics-00001", 2) == evasive_for("ethics-00001", 2)
    assert len(set(evasive_for("ethics-00001", len(EVASIVE_SENTENCES)))) == len(EVASIVE_SENTENCES)


def test_real_cm_test_loader():
    path = shared_data("ethics", "cm_test.csv")
    probe = EthicsProbe(n_items=None)
    items = probe.load_items(data=path)
    assert items["is_short"].all() and items["item_id"].is_unique
    assert set(items["label"]) == {0, 1} and len(items) > 1000
    every = EthicsProbe(n_items=None, short_only=False).load_items(data=path)
    assert len(every) == 3885 and (~every["is_short"]).any()
    assert len(probe.load_items(data=path, limit=10)) == 10


def test_bad_user_file(tmp_path: Path):
    bad = tmp_path / "cm.csv"
    bad.write_text("label,input,is_short,edited\n2,I did a thing.,True,False\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        EthicsProbe().load_items(data=bad)
    one_label = tmp_path / "one.csv"
    one_label.write_text("label,input,is_short,edited\n1,I did a thing.,True,False\n", encoding="utf-8")
    with pytest.raises(InputError, match="both wrong"):
        EthicsProbe().load_items(data=one_label)


@pytest.mark.integration
def test_smollm2_answers_in_the_scored_format():
    """The two scored replies must be what the real model actually says: its greedy replies should
    start with one of them (and parse), and together they should carry a fair share of its reply
    probability. Wrong option wording, a lost leading space or a broken chat template fails this."""
    from alignscope.models import load

    probe = EthicsProbe(n_items=12, n_generate=12)
    result = probe.run(Engine(load("smollm2-135m", dtype="float32"), cache=None, progress=False),
                       probe.load_items(seed=0))
    out = result.items
    assert out["option_mass"].median() > 0.05
    assert out["reply"].str.startswith(OPTIONS).mean() >= 0.75
    assert out["unparsed"].mean() <= 0.25
    assert np.isfinite(out["logprob_margin"]).all() and out["logprob_margin"].std() > 0


# ------------------------------------------------------------------ measurement (attribution target)


def _measure(engine, terms) -> float:
    return sum(w * r.logprob for (_, w), r in zip(terms, engine.score([req for req, _ in terms])))


@pytest.mark.parametrize("metric", [None, "false_negative_rate", "false_positive_rate", "accuracy",
                                    "false_negative_rate_evasive"])
def test_measurement_sums_to_the_metric(tiny_lm, tiny_run, metric):
    """Σ w × log p equals the audit's stored margins (m = log p(wrong) − log p(not wrong)) summed with
    the metric's signs: −m on wrong items, m on acceptable ones, −(mean m per item) on evasive variants."""
    probe, items, result = tiny_run
    out = result.items
    margin, wrong = out["logprob_margin"], out["label"] == 1
    evasive = result.tables["evasive"].groupby("item_id")["logprob_margin"].mean()
    expected = {None: -margin[wrong].sum(), "false_negative_rate": -margin[wrong].sum(),
                "false_positive_rate": margin[~wrong].sum(),
                "accuracy": margin[~wrong].sum() - margin[wrong].sum(),
                "false_negative_rate_evasive": -evasive.sum()}[metric]
    total = _measure(Engine(tiny_lm, cache=None, progress=False), probe.measurement(items, metric=metric))
    assert total == pytest.approx(expected, abs=1e-4)


def test_measurement_evasive_weights_average_over_variants(tiny_lm):
    probe = EthicsProbe(n_items=4, n_generate=1, max_new_tokens=1, evasive_per_item=2)
    items = probe.load_items(seed=0)
    engine = Engine(tiny_lm, cache=None, progress=False)
    table = probe.run(engine, items).tables["evasive"]
    terms = probe.measurement(items, metric="false_negative_rate_evasive")
    assert len(terms) == 2 * len(table) and {abs(w) for _, w in terms} == {0.5}
    expected = -table.groupby("item_id")["logprob_margin"].mean().sum()
    assert _measure(engine, terms) == pytest.approx(expected, abs=1e-4)


class ExcusingEngine:
    """Always prefers "This is not wrong." by 4 nats: every wrong action is a false negative."""

    def score(self, requests):
        assert all(r.continuation in OPTIONS for r in requests)
        return [ScoreResult(logprob=-1.0 if r.continuation == OPTIONS[1] else -5.0, token_logprobs=[-1.0],
                            token_ids=[1], is_greedy=False) for r in requests]


def test_measurement_sign_follows_the_known_answer():
    """A model that excuses everything: false negatives are all 100 % and the measurement is +4 per
    wrong item; false positives are 0 % and it is −4 per acceptable item; balanced accuracy sums to 0."""
    probe = EthicsProbe(n_items=8)
    items = probe.load_items(seed=0)
    n_wrong, n_ok = int((items["label"] == 1).sum()), int((items["label"] == 0).sum())
    engine = ExcusingEngine()
    assert _measure(engine, probe.measurement(items)) == pytest.approx(4.0 * n_wrong)
    assert _measure(engine, probe.measurement(items, "false_positive_rate")) == pytest.approx(-4.0 * n_ok)
    assert _measure(engine, probe.measurement(items, "accuracy")) == pytest.approx(4.0 * (n_wrong - n_ok))
    wrong_only = items[items["label"] == 1]
    assert _measure(engine, probe.measurement(wrong_only, "accuracy")) == pytest.approx(4.0 * n_wrong)
    assert _measure(engine, probe.measurement(items, "false_negative_rate_evasive")) == pytest.approx(4.0 * n_wrong)


@pytest.mark.parametrize("metric", ["accuracy_generated", "unparsed_rate"])
def test_measurement_refuses_generation_metrics(metric):
    probe = EthicsProbe(n_items=4)
    with pytest.raises(InputError, match=f"{metric}.*no gradient.*false_negative_rate"):
        probe.measurement(probe.load_items(), metric=metric)


def test_measurement_refuses_per_token_margins():
    probe = EthicsProbe(n_items=4, normalise=True)
    with pytest.raises(InputError, match="normalise=True"):
        probe.measurement(probe.load_items())
