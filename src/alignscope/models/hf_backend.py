"""The transformers backend: where tokens meet the model.

Scoring packs every continuation that follows the same context into one row, *after* a single
copy of the context ("tree" packing). A 4-D attention mask lets each continuation see the context
and itself but not its siblings, and position ids restart after the context, so each continuation
is scored exactly as if it were alone, while the context is computed once. For matched-guise
probing (texts × templates × 84 adjectives) this removes most of the work.

Only the hidden states at positions that predict a continuation token go through the LM head, so
no full-vocabulary log-softmax is ever kept for every position.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alignscope.errors import InputError
from alignscope.models.loading import LoadedModel
from alignscope.models.requests import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from alignscope.store import content_hash

# Longer packed rows share more context but attention over a row costs (row length)^2: at 1024
# tokens SDPA took ~28 % of a SmolLM2 forward on CPU; 512 gave the lowest total on the audit.
MAX_ROW_TOKENS = 512
GENERATE_CACHE_FACTOR = 8  # decode rows × (prompt + new tokens) may be this many times batch_tokens


@dataclass
class _Encoded:
    """A request as token ids: the context prefix and the continuation tokens to score."""

    index: int
    prefix: tuple[int, ...]
    continuation: list[int]


@dataclass
class _Row:
    """One packed sequence: a trie of contexts (flattened depth-first) with their continuations.

    ``parents[t]`` is the row index of the token that precedes token ``t`` in its own sequence
    (-1 for a first token), so a token attends exactly to its ancestors: the sequence it would
    have been alone. ``spans`` holds, per request, the row indices whose hidden states predict its
    continuation tokens.
    """

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    spans: list[tuple[_Encoded, list[int]]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def emit(self, token: int, position: int, parent: int) -> int:
        self.tokens.append(token)
        self.positions.append(position)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def add(self, enc: _Encoded, shared: int, prefix_at: list[int]) -> list[int]:
        """Append ``enc`` reusing the first ``shared`` context tokens already in the row at
        ``prefix_at``; returns the row indices of its whole context."""
        at = prefix_at[:shared]
        for depth in range(shared, len(enc.prefix)):
            at.append(self.emit(enc.prefix[depth], depth, at[-1] if at else -1))
        last, cursor = at[-1], len(enc.prefix)
        predictors = [last]
        for token in enc.continuation[:-1]:  # inputs; the final token is only a target
            last = self.emit(token, cursor, last)
            predictors.append(last)
            cursor += 1
        self.spans.append((enc, predictors))
        return at


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two id sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped into longest-first batches whose padded size (rows × longest) stays under
    ``batch_tokens`` (and at most ``max_rows`` rows); ties keep their input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def too_big(current: list[int], _: int) -> bool:
        return ((len(current) + 1) * lengths[current[0]] > batch_tokens
                or (max_rows is not None and len(current) >= max_rows))

    return greedy_batches(order, too_big)


def greedy_batches(order: Iterable[int], too_big: Callable[[list[int], int], bool]) -> list[list[int]]:
    """Consecutive batches over ``order``: a new batch starts when adding ``i`` to the current,
    non-empty one would be ``too_big(current, i)`` (the first index of a batch is its longest)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and too_big(current, i):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFBackend:
    """Scores and generates with a transformers (optionally PEFT-wrapped) causal LM."""

    name = "hf"

    def __init__(self, lm: LoadedModel, batch_tokens: int = 4096, share_context: bool = True,
                 share_prompt: bool = True, threads: int | str | None = "auto") -> None:
        if batch_tokens < 1:
            raise InputError("batch_tokens must be at least 1")
        self.lm = lm
        self.batch_tokens = batch_tokens
        self.share_context = share_context
        self.share_prompt = share_prompt
        if not (threads is None or threads == "auto" or (isinstance(threads, int) and threads >= 1)):
            raise InputError(f"threads must be a positive integer, 'auto' or None, got {threads!r}")
        self.threads = threads
        self._max_threads = torch.get_num_threads()
        base = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
        self._decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        self._head = base.get_output_embeddings()
        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        self._context_cache: dict[tuple[str, bool], list[int]] = {}

    # ------------------------------------------------------------------ tokenisation
    def context_text(self, context: str, chat: bool, system: str | None) -> str:
        if not chat:
            return context
        tok = self.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InputError(
                f"model {self.lm.spec}: has no chat template but a chat-mode request was made; "
                "use a chat model, set tokenizer.chat_template, or run the probe in plain mode"
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": context}
        ]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str, chat: bool) -> list[int]:
        # The chat template already spells out special tokens; adding them again would double BOS.
        return self.lm.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def _context_ids(self, text: str, chat: bool) -> list[int]:
        """Context tokenisation, memoised: probes put dozens of continuations after one context."""
        key = (text, chat)
        if key not in self._context_cache:
            if len(self._context_cache) > 100_000:
                self._context_cache.clear()
            self._context_cache[key] = self._ids(text, chat)
        return self._context_cache[key]

    def encode_score(self, index: int, req: ScoreRequest) -> _Encoded:
        """Continuation tokens = tokens of (context + continuation) minus the context's tokens.

        Tokenising the continuation on its own would drop the leading-space merge (" lazy" is one
        token, "lazy" another) — a classic bug in research code. Trailing whitespace of the
        context is moved to the continuation so it merges the way the model saw it in training.
        """
        context = self.context_text(req.context, req.chat, req.system)
        continuation = req.continuation
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        context = stripped
        ctx_ids = self._context_ids(context, req.chat)
        whole = self._ids(context + continuation, req.chat)
        shared = 0
        for a, b in zip(ctx_ids, whole):
            if a != b:
                break
            shared += 1
        prefix, cont = whole[:shared], whole[shared:]
        if not prefix:  # nothing to condition on: start from BOS (or EOS, as GPT-2 style models do)
            start = self.lm.tokenizer.bos_token_id
            start = self.lm.tokenizer.eos_token_id if start is None else start
            prefix = [start]
        if not cont:
            raise InputError(f"score request {index}: continuation {req.continuation!r} produced no tokens")
        return _Encoded(index=index, prefix=tuple(prefix), continuation=cont)

    # ------------------------------------------------------------------ scoring
    def _rows(self, encoded: list[_Encoded]) -> list[_Row]:
        """Pack requests into rows that share every common context prefix (a token trie).

        Requests sorted by context tokens are neighbours in the trie: each one only adds the
        context tokens after its longest common prefix with the previous one, then its
        continuation. So identical contexts are computed once (as before), and so are common
        beginnings of different contexts (a system prompt, a template's opening words). A row
        closes when the next request would push it past the row budget.
        """
        limit = max(1, min(self.batch_tokens, MAX_ROW_TOKENS))
        if not self.share_context:
            rows = []
            for enc in encoded:
                row = _Row()
                row.add(enc, 0, [])
                rows.append(row)
            return rows
        rows = []
        row, previous, prefix_at = _Row(), (), []
        for enc in sorted(encoded, key=lambda e: e.prefix):
            shared = common_prefix(previous, enc.prefix) if row.spans else 0
            shared = min(shared, len(enc.prefix))
            added = len(enc.prefix) - shared + len(enc.continuation) - 1
            if row.spans and row.length + added > limit:
                rows.append(row)
                row, shared = _Row(), 0
            prefix_at = row.add(enc, shared, prefix_at)
            previous = enc.prefix
        if row.spans:
            rows.append(row)
        return rows

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Length-sorted batches whose padded size (rows × longest) stays under the token budget."""
        return [[rows[i] for i in batch] for batch in token_batches([r.length for r in rows], self.batch_tokens)]

    def score(self, requests: Sequence[ScoreRequest], progress: bool = True) -> list[ScoreResult]:
        encoded = [self.encode_score(i, r) for i, r in enumerate(requests)]
        batches = self._batches(self._rows(encoded))
        results: list[ScoreResult | None] = [None] * len(requests)
        total_tokens = sum(r.length for b in batches for r in b)
        with torch.inference_mode(), tqdm(total=total_tokens, unit="tok", desc="score",
                                          disable=not progress, leave=False) as bar:
            for batch in batches:
                with _torch_threads(self._threads_now()):
                    scored = self._score_batch(batch)
                for enc, res in scored:
                    results[enc.index] = res
                bar.update(sum(r.length for r in batch))
        return [r for r in results if r is not None]

    def _score_batch(self, batch: list[_Row]) -> list[tuple[_Encoded, ScoreResult]]:
        device = self.lm.device
        width = max(r.length for r in batch)
        n = len(batch)
        pad_id = self.lm.tokenizer.pad_token_id or 0
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        parents = np.full((n, width), -1, dtype=np.int64)
        lengths = []
        # (row, position whose hidden state predicts the token, target token) for every scored token
        rows_idx: list[int] = []
        pos_idx: list[int] = []
        targets: list[int] = []
        spans: list[tuple[_Encoded, int, int]] = []
        for b, row in enumerate(batch):
            input_ids[b, :row.length] = torch.tensor(row.tokens)
            positions[b, :row.length] = torch.tensor(row.positions)
            parents[b, :row.length] = row.parents
            lengths.append(row.length)
            for enc, predictors in row.spans:
                spans.append((enc, len(targets), len(targets) + len(enc.continuation)))
                rows_idx += [b] * len(predictors)
                pos_idx += predictors
                targets += enc.continuation
        mask = self._tree_mask(parents, lengths, self.lm.dtype)
        hidden = self._decoder(
            input_ids=input_ids.to(device), attention_mask=mask.to(device),
            position_ids=positions.to(device), use_cache=False,
        ).last_hidden_state
        # Many targets share a predicting position (every first token after a context): run the
        # LM head once per distinct position, then index.
        flat = torch.tensor(rows_idx) * width + torch.tensor(pos_idx)
        unique, inverse = torch.unique(flat, return_inverse=True)
        picked = hidden.reshape(n * width, -1)[unique.to(device)]
        logits = self._head(picked).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        lse = torch.logsumexp(logits, dim=-1)
        best = logits.argmax(dim=-1)
        inverse = inverse.to(device)
        target = torch.tensor(targets, device=device)
        token_lp = logits[inverse, target] - lse[inverse]
        greedy = best[inverse] == target
        token_lp_list = token_lp.cpu().tolist()
        greedy_list = greedy.cpu().tolist()
        out = []
        for enc, start, end in spans:
            values = token_lp_list[start:end]
            out.append((enc, ScoreResult(logprob=float(sum(values)), token_logprobs=values,
                                         token_ids=list(enc.continuation),
                                         is_greedy=bool(all(greedy_list[start:end])))))
        return out

    @staticmethod
    def _tree_mask(parents: np.ndarray, lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Additive (batch, 1, L, L) mask: each token sees itself and its ancestors (its own
        sequence), nothing else. Padding sees itself only, which keeps every softmax row finite."""
        n, width = parents.shape
        allowed = np.zeros((n, width, width), dtype=bool)
        for b in range(n):
            seen = allowed[b]
            for t in range(lengths[b]):
                p = parents[b, t]
                if p >= 0:
                    seen[t] = seen[p]  # parents precede children, so their rows are complete
                seen[t, t] = True
            idx = np.arange(lengths[b], width)
            seen[idx, idx] = True
        mask = torch.zeros((n, width, width), dtype=dtype)
        mask.masked_fill_(~torch.from_numpy(allowed), torch.finfo(dtype).min)
        return mask[:, None]

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerateRequest], progress: bool = True) -> list[GenerateResult]:
        prompts = [self._ids(self.context_text(r.context, r.chat, r.system), r.chat) for r in requests]
        by_setting: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_setting[r.sampling_key].append(i)
        results: list[GenerateResult | None] = [None] * len(requests)
        work = []
        for indices in by_setting.values():
            indices.sort(key=lambda i: len(prompts[i]), reverse=True)
            work.extend(self._generation_batches(indices, prompts, requests))
        with torch.inference_mode():
            for batch in tqdm(work, desc="generate", unit="batch", disable=not progress, leave=False):
                with _torch_threads(self._threads_now()):
                    texts = self._generate_batch(batch, prompts, requests)
                for i, outs in zip(batch, texts):
                    results[i] = GenerateResult(texts=[_cut_at_stop(t, requests[i].stop) for t in outs])
        return [r for r in results if r is not None]

    def _generate_batch(self, batch: list[int], prompts: list[list[int]],
                        requests: Sequence[GenerateRequest]) -> list[list[str]]:
        if self.share_prompt:
            return self._decode_batch([prompts[i] for i in batch], [requests[i] for i in batch])
        return self._hf_generate_batch([prompts[i] for i in batch], requests[batch[0]], seed=requests[batch[0]].seed)

    def _threads_now(self) -> int | None:
        """Intra-op threads for the next batch: the configured number, or with ``"auto"`` the
        cores no other process is using right now (at least 1, at most torch's default).

        On a shared CPU a second thread that waits for a busy core at every parallel region
        costs more than it brings (measured here: a 512-token forward took 1.8x the wall time and
        2.2x the CPU time with 2 threads than with 1 while other jobs ran); on an idle machine
        all cores are used.
        """
        if self.threads != "auto":
            return self.threads  # type: ignore[return-value]
        others = _other_runnable_tasks()
        if others is None:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(self._max_threads, cores - others))

    def _generation_batches(self, indices: list[int], prompts: list[list[int]],
                            requests: Sequence[GenerateRequest]) -> list[list[int]]:
        """Length-sorted batches. With a shared prompt the prompt pass costs (prompts x longest)
        and must fit ``batch_tokens``; the k-fold cache of the decode steps may use
        ``GENERATE_CACHE_FACTOR`` times that. Without sharing, HF's generate repeats every prompt
        k times, so (prompts x k x (longest + new tokens)) must fit ``batch_tokens``."""
        def too_big(current: list[int], i: int) -> bool:
            req = requests[i]
            longest, rows = len(prompts[current[0]]), len(current) + 1
            decode = rows * req.num_samples * (longest + req.max_new_tokens)
            if self.share_prompt:
                return rows * longest > self.batch_tokens or decode > GENERATE_CACHE_FACTOR * self.batch_tokens
            return decode > self.batch_tokens

        return greedy_batches(indices, too_big)

    def _next_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden[:, -1]).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        config = getattr(self.lm.model, "generation_config", None)
        for value in (getattr(config, "eos_token_id", None), self.lm.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value is not None:
                ids.update(int(v) for v in value)
        return ids

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prompts right-aligned in one (ids, attention mask) pair, and the pad id used."""
        tok = self.lm.tokenizer
        width = max(len(p) for p in prompts)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            attn[b, width - len(p):] = 1
        return ids, attn, pad_id

    def _decode_batch(self, prompts: list[list[int]], reqs: list[GenerateRequest]) -> list[list[str]]:
        """Prompts run once (left-padded); their cache is repeated k times; then token by token.

        Every sample has its own random generator, seeded from its request (context, system,
        chat, seed) and its sample index, so a request's samples do not depend on which other
        requests shared its batch, and sample j is the same whatever k is. Rows leave the batch
        when they emit an end-of-sequence token or a stop string; the loop ends when none is left.
        """
        settings = reqs[0]  # one sampling key per batch
        k, new_tokens = settings.num_samples, settings.max_new_tokens
        tok = self.lm.tokenizer
        device = self.lm.device
        ids, attn, _ = self._left_padded(prompts)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self._decoder(input_ids=ids.to(device), attention_mask=attn.to(device),
                            position_ids=positions.to(device), use_cache=True)
        cache = out.past_key_values
        logits = self._next_logits(out.last_hidden_state)
        next_pos = positions[:, -1] + 1
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, dim=0)
            attn = attn.repeat_interleave(k, dim=0)
            next_pos = next_pos.repeat_interleave(k, dim=0)
        attn, next_pos = attn.to(device), next_pos.to(device)
        sampling = settings.temperature > 0
        generators = [_sample_generator(r, j) for r in reqs for j in range(k)] if sampling else []
        stop_ids = self._stop_ids()
        alive = list(range(len(prompts) * k))  # original row of each row still in the batch
        tokens: list[list[int]] = [[] for _ in alive]
        for step in range(new_tokens):
            chosen = self._choose(logits, settings, [generators[r] for r in alive] if sampling else [])
            keep = []
            for j, (row, token) in enumerate(zip(alive, chosen.tolist())):
                if token in stop_ids:
                    continue
                tokens[row].append(token)
                if settings.stop and any(s in tok.decode(tokens[row], skip_special_tokens=True)
                                         for s in settings.stop):
                    continue
                keep.append(j)
            if step == new_tokens - 1 or not keep:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attn, next_pos, chosen = attn[index], next_pos[index], chosen[index]
                alive = [alive[j] for j in keep]
            attn = torch.cat([attn, attn.new_ones((len(alive), 1))], dim=1)
            out = self._decoder(input_ids=chosen[:, None].to(device), attention_mask=attn,
                                position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = self._next_logits(out.last_hidden_state)
            next_pos = next_pos + 1
        texts = tok.batch_decode(tokens, skip_special_tokens=True)
        return [texts[b * k:(b + 1) * k] for b in range(len(prompts))]

    @staticmethod
    def _choose(logits: torch.Tensor, settings: GenerateRequest, generators: list[torch.Generator]) -> torch.Tensor:
        """Greedy argmax, or a draw from the temperature-scaled, top-p-truncated distribution."""
        if settings.temperature == 0:
            return logits.argmax(dim=-1).cpu()
        scores = logits / settings.temperature
        if settings.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > settings.top_p  # keeps the top token always
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(dim=-1).cpu()
        return torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(generators)])

    def _hf_generate_batch(self, prompts: list[list[int]], settings: GenerateRequest, seed: int) -> list[list[str]]:
        """transformers' ``generate`` (``share_prompt=False``): each prompt is run k times and the
        global torch seed is set once per batch (the engine's behaviour before ENGINE_VERSION 2)."""
        tok = self.lm.tokenizer
        ids, attn, pad_id = self._left_padded(prompts)
        width = ids.shape[1]
        sample = settings.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=settings.max_new_tokens, do_sample=sample,
            num_return_sequences=settings.num_samples, pad_token_id=pad_id,
        )
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=tok)
        torch.manual_seed(seed)
        device = self.lm.device
        out = self.lm.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        new = out[:, width:].cpu()
        texts = tok.batch_decode(new, skip_special_tokens=True)
        k = settings.num_samples
        return [texts[b * k:(b + 1) * k] for b in range(len(prompts))]


def _sample_generator(request: GenerateRequest, sample: int) -> torch.Generator:
    """A CPU generator for sample ``sample`` of ``request``: a function of the request's content
    and seed only (not of k, the token budget or the batch it ran in)."""
    key = content_hash({"context": request.context, "system": request.system, "chat": request.chat,
                        "seed": request.seed, "sample": sample}, length=16)
    return torch.Generator().manual_seed(int(key, 16) & ((1 << 63) - 1))


def _other_runnable_tasks(samples: int = 5, interval: float = 0.004) -> int | None:
    """Median number of runnable tasks besides this thread (``/proc/loadavg``), None if unknown."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as fh:
                running = int(fh.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)  # the reading thread itself is running
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)))


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave the setting alone), then restore it."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


BackendFactory = Callable[[LoadedModel], Any]
