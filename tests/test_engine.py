"""The engine: exact scoring with shared contexts, ordering, caching, generation."""

from __future__ import annotations

import random

import pytest

from alignscope.models import Engine, GenerateRequest, ResultCache, ScoreRequest
from alignscope.models.reference import reference_logprobs

ADJECTIVES = [" lazy", " intelligent", " aggressive", " kind", " musical", " very quick-tempered", "ly odd"]
TEXTS = ["I be working every day", "I am working every day", "She been knew that", ""]


def guise_requests() -> list[ScoreRequest]:
    reqs = [ScoreRequest(f'A person who says "{t}" tends to be', a) for t in TEXTS for a in ADJECTIVES]
    reqs += [ScoreRequest("The capital of France is ", "Paris"),  # trailing space moves to continuation
             ScoreRequest("", "Hello there"),  # empty context: conditioned on BOS
             ScoreRequest("Is stealing wrong?", " Yes, it is.", chat=True),
             ScoreRequest("Is stealing wrong?", " No.", chat=True, system="Answer briefly.")]
    return reqs


def test_shared_context_matches_one_at_a_time(tiny_lm):
    reqs = guise_requests()
    engine = Engine(tiny_lm, cache=None, progress=False)
    got = engine.score(reqs)
    want = reference_logprobs(tiny_lm, reqs)
    for res, ref in zip(got, want):
        assert res.token_logprobs == pytest.approx(ref, abs=1e-4)
        assert res.logprob == pytest.approx(sum(ref), abs=1e-4)


def test_independent_of_order_and_batch_size(tiny_lm):
    reqs = guise_requests()
    base = [r.logprob for r in Engine(tiny_lm, cache=None, progress=False).score(reqs)]
    order = list(range(len(reqs)))
    random.Random(1).shuffle(order)
    shuffled = Engine(tiny_lm, batch_tokens=64, cache=None, progress=False).score([reqs[i] for i in order])
    for pos, i in enumerate(order):
        assert shuffled[pos].logprob == pytest.approx(base[i], abs=1e-4)
    unshared = Engine(tiny_lm, share_context=False, batch_tokens=1, cache=None, progress=False).score(reqs)
    assert [r.logprob for r in unshared] == pytest.approx(base, abs=1e-4)


def test_continuation_keeps_its_leading_space(tiny_lm):
    """' lazy' after a context is the single space-prefixed token, not the bare word 'lazy'."""
    [res] = Engine(tiny_lm, cache=None, progress=False).score([ScoreRequest("He is", " lazy")])
    tok = tiny_lm.tokenizer
    assert res.token_ids == tok(" lazy", add_special_tokens=False)["input_ids"]
    assert res.token_ids != tok("lazy", add_special_tokens=False)["input_ids"]


def test_second_run_is_a_cache_hit(tiny_lm, tmp_path):
    reqs = guise_requests()[:10]
    first = Engine(tiny_lm, cache=ResultCache(tmp_path / "c.sqlite"), progress=False)
    a = first.score(reqs + reqs[:3])  # duplicates inside one call are computed once
    assert first.backend_calls == 10
    second = Engine(tiny_lm, cache=ResultCache(tmp_path / "c.sqlite"), progress=False)
    b = second.score(reqs)
    assert second.backend_calls == 0
    assert [x.logprob for x in a[:10]] == [x.logprob for x in b]


def test_cache_is_keyed_by_model_identity(tiny_lm, tmp_path):
    import torch

    cache = ResultCache(tmp_path / "c.sqlite")
    reqs = guise_requests()[:4]
    Engine(tiny_lm, cache=cache, progress=False).score(reqs)
    original = tiny_lm.model.model.norm.weight.detach().clone()
    try:
        with torch.no_grad():
            tiny_lm.model.model.norm.weight.mul_(1.5)
        tiny_lm.invalidate_fingerprint()
        changed = Engine(tiny_lm, cache=cache, progress=False)
        changed.score(reqs)
        assert changed.backend_calls == 4
    finally:
        with torch.no_grad():
            tiny_lm.model.model.norm.weight.copy_(original)
        tiny_lm.invalidate_fingerprint()


def test_greedy_generation_is_batch_independent(tiny_lm):
    prompts = ["Tell me a story about", "Hi", "The weather today is quite", "Is lying ever acceptable?"]
    reqs = [GenerateRequest(p, max_new_tokens=8) for p in prompts]
    batched = Engine(tiny_lm, cache=None, progress=False).generate(reqs)
    single = [Engine(tiny_lm, cache=None, progress=False, batch_tokens=1).generate([r])[0] for r in reqs]
    assert [b.texts for b in batched] == [s.texts for s in single]
    assert all(len(b.texts) == 1 for b in batched)


def test_sampling_is_seeded_and_draws_k(tiny_lm):
    req = GenerateRequest("Once upon a time", max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    a = Engine(tiny_lm, cache=None, progress=False).generate([req])[0].texts
    b = Engine(tiny_lm, cache=None, progress=False).generate([req])[0].texts
    assert a == b and len(a) == 3
    other = Engine(tiny_lm, cache=None, progress=False).generate(
        [GenerateRequest("Once upon a time", max_new_tokens=6, temperature=1.0, num_samples=3, seed=8)])
    assert other[0].texts != a  # random weights: a different seed gives different samples


def test_stop_sequences_truncate(tiny_lm):
    [free] = Engine(tiny_lm, cache=None, progress=False).generate([GenerateRequest("Hello", max_new_tokens=12)])
    text = free.texts[0]
    assert len(text) > 3
    stop = text[2:4]
    [cut] = Engine(tiny_lm, cache=None, progress=False).generate(
        [GenerateRequest("Hello", max_new_tokens=12, stop=(stop,))])
    assert stop not in cut.texts[0] and text.startswith(cut.texts[0])


def test_bad_requests_are_refused():
    from alignscope.errors import InputError

    with pytest.raises(InputError, match="empty continuation"):
        ScoreRequest("context", "")
    with pytest.raises(InputError, match="temperature"):
        GenerateRequest("x", num_samples=2)


@pytest.mark.integration
def test_real_smollm2_shared_scoring_bf16_close_to_fp32(smollm2_dir):
    """bf16 scoring stays within 0.5 nats of fp32 per sequence (the documented trade-off)."""
    from alignscope.models import load

    reqs = guise_requests()[:14]
    fp32 = Engine(load("smollm2-135m", dtype="float32"), cache=None, progress=False).score(reqs)
    ref = reference_logprobs(load(str(smollm2_dir), dtype="float32"), reqs)
    assert [r.logprob for r in fp32] == pytest.approx([sum(x) for x in ref], abs=1e-3)
    bf16 = Engine(load("smollm2-135m", dtype="bfloat16"), cache=None, progress=False).score(reqs)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(fp32, bf16)) < 0.5


def test_contexts_sharing_a_beginning_are_packed_once_and_scored_exactly(tiny_lm):
    """Different contexts with a common start (a system prompt, a template's opening) share it."""
    from alignscope.models.hf_backend import HFBackend

    system = "You are a helpful assistant. Answer with one word, and think about the question first."
    reqs = [ScoreRequest(q, a, chat=True, system=system)
            for q in ("Is the sky blue?", "Is grass red?", "Is water wet?") for a in ("Yes.", "No.")]
    reqs += [ScoreRequest(f"The {w} of the story is", c) for w in ("hero", "villain") for c in (" brave", " kind")]
    got = Engine(tiny_lm, cache=None, progress=False).score(reqs)
    want = reference_logprobs(tiny_lm, reqs)
    for res, ref in zip(got, want):
        assert res.token_logprobs == pytest.approx(ref, abs=1e-4)
    backend = HFBackend(tiny_lm)
    encoded = [backend.encode_score(i, r) for i, r in enumerate(reqs)]
    shared = sum(row.length for row in backend._rows(encoded))
    backend.share_context = False
    alone = sum(row.length for row in backend._rows(encoded))
    system_tokens = len(tiny_lm.tokenizer(system)["input_ids"])
    assert shared <= alone - 2 * system_tokens  # the system prompt is fed once, not three times


def test_samples_do_not_depend_on_batch_or_k(tiny_lm):
    req = GenerateRequest("Once upon a time", max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    alone = Engine(tiny_lm, cache=None, progress=False).generate([req])[0].texts
    others = [GenerateRequest(p, max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
              for p in ("A long time ago, in a land far away,", "Hi")]
    batched = Engine(tiny_lm, cache=None, progress=False).generate(others + [req])[-1].texts
    assert batched == alone
    fewer = GenerateRequest("Once upon a time", max_new_tokens=6, temperature=1.0, num_samples=2, seed=7)
    assert Engine(tiny_lm, cache=None, progress=False).generate([fewer])[0].texts == alone[:2]
    assert len(set(alone)) > 1  # k samples are not copies of one draw


def test_greedy_decode_loop_matches_transformers_generate(tiny_lm):
    prompts = ["Tell me a story about", "Hi", "Is lying ever acceptable?"]
    reqs = [GenerateRequest(p, max_new_tokens=8) for p in prompts]
    reqs += [GenerateRequest("Is stealing wrong?", max_new_tokens=8, chat=True, system="Answer briefly.")]
    ours = Engine(tiny_lm, cache=None, progress=False).generate(reqs)
    theirs = Engine(tiny_lm, cache=None, progress=False, share_prompt=False).generate(reqs)
    assert [r.texts for r in ours] == [r.texts for r in theirs]


def test_thread_setting_is_validated_and_restored(tiny_lm):
    import torch

    from alignscope.errors import InputError

    with pytest.raises(InputError, match="threads"):
        Engine(tiny_lm, cache=None, threads=0)
    before = torch.get_num_threads()
    Engine(tiny_lm, cache=None, progress=False, threads=1).generate([GenerateRequest("Hi", max_new_tokens=2)])
    assert torch.get_num_threads() == before
