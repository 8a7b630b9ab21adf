"""Audit runner and compare: artefacts, caching, paired comparison of two models, item-set errors."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest
import torch

from alignscope.audit.base import Metric, Probe, ProbeResult, limit_items, percent, register, score_options
from alignscope.audit.runner import audit, audited_probes, available_probes, compare
from alignscope.errors import InputError
from alignscope.models import Engine, load


@register
class YesNoProbe(Probe):
    """Test probe: does the model prefer ' yes' over ' no' after simple questions?"""

    name = "test_yes_no"
    description = "test probe"
    metrics = (
        Metric("yes_pct", "yes", "share preferring yes", "%", (0, 100), "further_from_ideal_is_worse", 50,
               statistic=percent, binary=True),
        Metric("yes_margin", "margin", "log p(yes) - log p(no)", "nats", (-50, 50), "higher_is_worse", 0),
    )

    def load_items(self, data=None, limit=None, seed=0):
        items = pd.DataFrame({"item_id": [f"q{i}" for i in range(30)],
                              "question": [f"Question {i}: is {i} even?" for i in range(30)]})
        return limit_items(items, limit, seed)

    def run(self, engine, items):
        lp = score_options(engine, items["question"].tolist(), [" yes", " no"])
        margin = lp[:, 0] - lp[:, 1]
        out = items.assign(margin=margin, yes=(margin > 0).astype(float))
        return ProbeResult(items=out, notes=["toy"])


def test_audit_writes_items_summary_and_caches(tiny_lm, tmp_path):
    engine = Engine(tiny_lm, cache=None, progress=False)
    done = audit(engine, ["test_yes_no"], tmp_path / "a", limit=20)
    art = done["test_yes_no"]
    items = pd.read_parquet(art.file("items.parquet"))
    summary = json.loads(art.file("summary.json").read_text())
    assert len(items) == 20 and items["item_id"].is_unique
    assert summary["metrics"]["yes_pct"]["ideal"] == 50
    assert summary["metrics"]["yes_pct"]["value"] == pytest.approx(items["yes"].mean() * 100)
    calls = engine.backend_calls
    again = audit(engine, ["test_yes_no"], tmp_path / "a", limit=20)
    assert engine.backend_calls == calls and again["test_yes_no"].key == art.key


def test_compare_identical_models_finds_nothing(tiny_lm, tmp_path):
    engine = Engine(tiny_lm, cache=None, progress=False)
    audit(engine, ["test_yes_no"], tmp_path / "a")
    audit(engine, ["test_yes_no"], tmp_path / "b")
    table = compare(tmp_path / "a", tmp_path / "b")
    assert set(table["metric"]) == {"yes_pct", "yes_margin"}
    assert (table["delta"] == 0).all() and not table["significant"].any()
    assert (table["p_holm"] == 1).all()


def test_compare_detects_a_changed_model(tiny_model_dir, tmp_path):
    base = load(str(tiny_model_dir), dtype="float32")
    audit(Engine(base, cache=None, progress=False), ["test_yes_no"], tmp_path / "a")
    changed = load(str(tiny_model_dir), dtype="float32")
    torch.manual_seed(3)
    with torch.no_grad():  # a different model: perturbed final norm
        changed.model.model.norm.weight.add_(torch.randn_like(changed.model.model.norm.weight))
    changed.invalidate_fingerprint()
    audit(Engine(changed, cache=None, progress=False), ["test_yes_no"], tmp_path / "b")
    table = compare(tmp_path / "a", tmp_path / "b").set_index("metric")
    assert table.loc["yes_margin", "delta"] != 0
    assert table.loc["yes_margin", "test"] == "permutation"
    assert table.loc["yes_pct", "test"] in ("mcnemar", "identical")
    assert np.isfinite(table["p_holm"]).all()


def test_compare_refuses_different_item_sets_unless_intersect(tiny_lm, tmp_path):
    engine = Engine(tiny_lm, cache=None, progress=False)
    audit(engine, ["test_yes_no"], tmp_path / "a", limit=20)
    audit(engine, ["test_yes_no"], tmp_path / "b", limit=25)
    with pytest.raises(InputError, match="--intersect"):
        compare(tmp_path / "a", tmp_path / "b")
    table = compare(tmp_path / "a", tmp_path / "b", intersect=True)
    assert (table["n"] <= 20).all()
    with pytest.raises(InputError, match="no audit results"):
        audited_probes(tmp_path)


@register
class ExtraMetricProbe(YesNoProbe):
    """Test probe whose instances add a metric when given data (like TruthfulQA MC1/MC2)."""

    name = "test_extra_metric"
    EXTRA = Metric("margin_tail", "margin", "90th percentile of the margin", "nats", (-50, 50),
                   "higher_is_worse", 0, statistic=lambda x: float(np.percentile(x, 90)))

    def load_items(self, data=None, limit=None, seed=0):
        self.metrics = type(self).metrics + ((self.EXTRA,) if data is not None else ())
        return super().load_items(None, limit, seed)


_p90 = ExtraMetricProbe.EXTRA.statistic
_p90.__name__ = "p90_for_tests"


def test_compare_uses_the_metrics_recorded_in_both_runs(tiny_lm, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("x")
    engine = Engine(tiny_lm, cache=None, progress=False)
    for run in ("a", "b"):
        audit(engine, ["test_extra_metric"], tmp_path / run, data={"test_extra_metric": data})
    audit(engine, ["test_extra_metric"], tmp_path / "plain")
    summary = json.loads(audited_probes(tmp_path / "a")["test_extra_metric"].file("summary.json").read_text())
    assert summary["metrics"]["margin_tail"]["statistic"] == "p90_for_tests"
    table = compare(tmp_path / "a", tmp_path / "b")
    assert list(table["metric"]) == ["yes_pct", "yes_margin", "margin_tail"]  # the instance metric too
    row = table.set_index("metric").loc["margin_tail"]
    assert row["delta"] == 0 and row["value_a"] == pytest.approx(summary["metrics"]["margin_tail"]["value"])
    # reported by one run only: left out, the shared metrics are still compared
    assert list(compare(tmp_path / "a", tmp_path / "plain")["metric"]) == ["yes_pct", "yes_margin"]


def test_compare_refuses_metrics_defined_differently(tiny_lm, tmp_path):
    engine = Engine(tiny_lm, cache=None, progress=False)
    audit(engine, ["test_yes_no"], tmp_path / "a")
    audit(engine, ["test_yes_no"], tmp_path / "b")
    path = audited_probes(tmp_path / "b")["test_yes_no"].file("summary.json")
    summary = json.loads(path.read_text())
    summary["metrics"]["yes_margin"]["direction"] = "higher_is_better"
    path.write_text(json.dumps(summary))
    with pytest.raises(InputError, match="yes_margin.*differently"):
        compare(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("name", sorted(n for n, cls in available_probes().items()
                                         if cls.__module__.startswith("alignscope.")))  # not this file's doubles
def test_every_probe_refuses_an_unknown_option(name):
    """A misspelt option must not silently run the defaults (it is a user's --option or audit.options),
    and the refusal lists exactly the options the probe accepts when they are all given."""
    cls = available_probes()[name]
    with pytest.raises(InputError, match="unknown option.*colour") as refused:
        cls(colour="red")
    assert str(refused.value).endswith("known: " + ", ".join(cls.option_names())) and cls.option_names()
    defaults = cls.DEFAULTS if isinstance(getattr(cls, "DEFAULTS", None), dict) else {
        n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
        if n in cls.option_names() and p.default is not inspect.Parameter.empty}
    cls(**defaults)  # every listed option, at its default, is accepted
