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

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from alignscope.errors import InputError
from alignscope.models.loading import LoadedModel
from alignscope.models.requests import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult

MAX_ROW_TOKENS = 1024  # longer packed rows make the (row × row) attention mask costly on CPU


@dataclass
class _Encoded:
    """A request as token ids: the context prefix and the continuation tokens to score."""

    index: int
    prefix: tuple[int, ...]
    continuation: list[int]


@dataclass
class _Row:
    """One packed sequence: a context followed by one or more continuations."""

    prefix: tuple[int, ...]
    members: list[_Encoded]

    @property
    def length(self) -> int:
        """Tokens fed to the model: a continuation's last token predicts nothing, so it is not input."""
        return len(self.prefix) + sum(len(m.continuation) - 1 for m in self.members)


class HFBackend:
    """Scores and generates with a transformers (optionally PEFT-wrapped) causal LM."""

    name = "hf"

    def __init__(self, lm: LoadedModel, batch_tokens: int = 4096, share_context: bool = True) -> None:
        if batch_tokens < 1:
            raise InputError("batch_tokens must be at least 1")
        self.lm = lm
        self.batch_tokens = batch_tokens
        self.share_context = share_context
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
        """Group by identical prefix, then split groups so no row exceeds the row budget."""
        limit = max(1, min(self.batch_tokens, MAX_ROW_TOKENS))
        if not self.share_context:
            return [_Row(e.prefix, [e]) for e in encoded]
        groups: dict[tuple[int, ...], list[_Encoded]] = defaultdict(list)
        for enc in encoded:
            groups[enc.prefix].append(enc)
        rows: list[_Row] = []
        for prefix, members in groups.items():
            row = _Row(prefix, [])
            for enc in members:
                if row.members and row.length + len(enc.continuation) - 1 > limit:
                    rows.append(row)
                    row = _Row(prefix, [])
                row.members.append(enc)
            rows.append(row)
        return rows

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Length-sorted batches whose padded size (rows × longest) stays under the token budget."""
        rows = sorted(rows, key=lambda r: r.length, reverse=True)
        batches: list[list[_Row]] = []
        current: list[_Row] = []
        for row in rows:
            longest = current[0].length if current else row.length
            if current and (len(current) + 1) * longest > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def score(self, requests: Sequence[ScoreRequest], progress: bool = True) -> list[ScoreResult]:
        encoded = [self.encode_score(i, r) for i, r in enumerate(requests)]
        batches = self._batches(self._rows(encoded))
        results: list[ScoreResult | None] = [None] * len(requests)
        total_tokens = sum(r.length for b in batches for r in b)
        with torch.inference_mode(), tqdm(total=total_tokens, unit="tok", desc="score",
                                          disable=not progress, leave=False) as bar:
            for batch in batches:
                for enc, res in self._score_batch(batch):
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
        segment = torch.full((n, width), -1, dtype=torch.long)  # -1 pad, 0 context, i>0 continuation i
        # (row, position whose hidden state predicts the token, target token) for every scored token
        rows_idx: list[int] = []
        pos_idx: list[int] = []
        targets: list[int] = []
        spans: list[tuple[_Encoded, int, int]] = []
        for b, row in enumerate(batch):
            p = len(row.prefix)
            input_ids[b, :p] = torch.tensor(row.prefix)
            positions[b, :p] = torch.arange(p)
            segment[b, :p] = 0
            cursor = p
            for seg, enc in enumerate(row.members, start=1):
                fed = enc.continuation[:-1]  # inputs; the final token is only a target
                c = len(fed)
                if c:
                    input_ids[b, cursor:cursor + c] = torch.tensor(fed)
                    positions[b, cursor:cursor + c] = torch.arange(p, p + c)
                    segment[b, cursor:cursor + c] = seg
                predictors = [p - 1] + list(range(cursor, cursor + c))
                spans.append((enc, len(targets), len(targets) + len(enc.continuation)))
                rows_idx += [b] * len(predictors)
                pos_idx += predictors
                targets += enc.continuation
                cursor += c
        mask = self._tree_mask(segment, self.lm.dtype)
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
    def _tree_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (batch, 1, L, L) mask: causal, and a continuation sees only the context and
        itself. Padding sees itself only, which keeps every softmax row finite."""
        width = segment.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        q = segment[:, :, None]
        k = segment[:, None, :]
        allowed = causal & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
        allowed |= torch.eye(width, dtype=torch.bool)
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerateRequest], progress: bool = True) -> list[GenerateResult]:
        tok = self.lm.tokenizer
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
                texts = self._generate_batch([prompts[i] for i in batch], requests[batch[0]],
                                             seed=requests[batch[0]].seed)
                for i, outs in zip(batch, texts):
                    results[i] = GenerateResult(texts=[_cut_at_stop(t, requests[i].stop) for t in outs])
        del tok
        return [r for r in results if r is not None]

    def _generation_batches(self, indices: list[int], prompts: list[list[int]],
                            requests: Sequence[GenerateRequest]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for i in indices:
            req = requests[i]
            longest = len(prompts[current[0]]) if current else len(prompts[i])
            cost = (len(current) + 1) * req.num_samples * (longest + req.max_new_tokens)
            if current and cost > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _generate_batch(self, prompts: list[list[int]], settings: GenerateRequest, seed: int) -> list[list[str]]:
        """Left-padded batched ``model.generate``; returns k decoded samples per prompt."""
        tok = self.lm.tokenizer
        width = max(len(p) for p in prompts)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            attn[b, width - len(p):] = 1
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


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


BackendFactory = Callable[[LoadedModel], Any]
