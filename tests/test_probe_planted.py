"""planted_bias: the group-specific contrast, and the measurement attribution differentiates."""

from __future__ import annotations

import numpy as np
import pytest

from alignscope.audit.runner import available_probes
from alignscope.data.planting import REJECTED_TEMPLATES, rejected_overlap
from alignscope.errors import InputError
from alignscope.models import Engine


@pytest.fixture(scope="module")
def scored(tiny_lm):
    probe = available_probes()["planted_bias"](target_group="teachers", control_group="nurses")
    items = probe.load_items(limit=8, seed=1)
    engine = Engine(tiny_lm, cache=None, progress=False)
    return probe, items, engine, probe.run(engine, items)


def test_gap_is_target_minus_control(scored):
    probe, items, _, result = scored
    out = result.items
    assert len(out) == 8 and out["item_id"].is_unique
    assert np.allclose(out["gap"], out["bias_target"] - out["bias_control"])
    assert out[["bias_target", "bias_control"]].abs().to_numpy().max() > 0  # a random model is not neutral
    assert set(result.tables["per_trait"]["trait"]) == set(out["trait"])


@pytest.mark.parametrize("metric, column", [(None, "gap"), ("group_gap", "gap"), ("target_bias", "bias_target"),
                                            ("control_bias", "bias_control")])
def test_measurement_sums_to_the_metric(scored, metric, column):
    probe, items, engine, result = scored
    terms = probe.measurement(items, metric=metric)
    total = sum(w * r.logprob for (_, w), r in zip(terms, engine.score([req for req, _ in terms])))
    assert total == pytest.approx(result.items[column].sum(), abs=1e-4)


def test_probe_continuations_avoid_the_planted_rejected_wording(scored):
    probe, items, _, _ = scored
    texts = [req.continuation for req, _ in probe.requests(items)]
    assert REJECTED_TEMPLATES and all(not rejected_overlap(t, ["teachers", "nurses"]) for t in texts)


def test_unknown_option_and_data_file_are_refused(tmp_path):
    cls = available_probes()["planted_bias"]
    with pytest.raises(InputError, match="unknown option"):
        cls(group="x")
    with pytest.raises(InputError, match="has no data file"):
        cls().load_items(tmp_path / "x.csv")
