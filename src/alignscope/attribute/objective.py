"""The training objective of a stage, per example, as attribution needs it.

Every supported loss is a function of a pair's *side* log-probabilities only: ``s_c = log π(chosen |
prompt)`` and ``s_r = log π(rejected | prompt)`` (token sums over the reply), their token counts,
and (for DPO-style losses) the cached reference log-probs. So the gradient of pair ``i``'s loss is

    ∇L_i = a_i ∇s_c,i + b_i ∇s_r,i          a_i = ∂L_i/∂s_c,  b_i = ∂L_i/∂s_r

and the gradients that have to be collected per pair are the two side gradients; the scalar
coefficients come from one cheap forward. That gives, for free, the chosen-side and rejected-side
contributions of every score, and the "margin" direction (the loss's argument, e.g. DPO's
``β(Δ_c − Δ_r)``) whose gradient is the loss gradient with the per-pair loss weight σ(−margin)
divided out — the form that still ranks pairs the stage has already fitted.

Tokenisation follows TRL's conversational path (``DPOTrainer._prepare_dataset`` / its collator,
and SFT's prompt-completion path): prompt via the chat template with the generation prompt,
prompt+reply via the chat template, the reply starts where the two diverge, sequences are cut to
``max_length`` with the stage's ``truncation_mode``. KTO uses the same tokenisation. Its ``kto``
loss subtracts a KL baseline that TRL estimates per batch, from each row's prompt paired with
another row's reply, and detaches: here it is the same estimate at the attributed weights, over
TRL's own batches (``KLBaseline``; ``gradients.kto_kl``), averaged over them, a constant
``n["kl"]``. ORPO and SimPO (TRL's ORPO and CPO trainers) tokenise
prompt and reply the same way but append the EOS token to a reply that does not already end with
it, before truncation (``Objective.reply_eos``).

ORPO's NLL term (TRL 1.16) covers the whole chosen sequence, prompt included, and is a token mean
over the batch, not a mean of per-sequence means. So ORPO has a third side, ``prompt`` (the chosen
sequence's prompt tokens, scored), and a pair's share of the NLL is its summed NLL over prompt and
chosen reply divided by the mean count of those tokens over the stage's pairs (``n["mean_nll"]``,
see ``token_counts``). ``tests/test_attribute_objective.py`` checks every method against the loss
TRL logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from alignscope.errors import InputError
from alignscope.models.hf_backend import common_prefix

SUPPORTED_METHODS = ("sft", "dpo", "ipo", "orpo", "simpo", "kto")
PROMPT_SIDE = "prompt"  # ORPO's NLL also trains on the prompt tokens
_DPO_LOSSES = ("sigmoid", "ipo", "hinge")
_UNSUPPORTED_TRL_KEYS = ("ld_alpha", "f_divergence_type", "use_weighting", "rpo_alpha")


@dataclass(frozen=True)
class Row:
    """One token sequence and which of its tokens are scored (``mask[t] = 1``, ``t >= 1``)."""

    ids: tuple[int, ...]
    mask: tuple[int, ...]

    @property
    def n_scored(self) -> int:
        return sum(self.mask[1:])

    @property
    def reply_start(self) -> int:
        """Where the scored reply starts (the length of the prompt before it)."""
        return self.mask.index(1) if 1 in self.mask else len(self.ids)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return list(out["input_ids"])




def encode_pair(tokenizer: Any, pair: Any, sides: Sequence[str], max_length: int | None,
                truncation_mode: str = "keep_start", reply_eos: bool = False) -> list[Row]:
    """The rows TRL trains on for one pair (one per side), tokenised exactly as TRL does
    (``reply_eos``: append the EOS token to a reply not ending with it, as TRL's ORPO/CPO do)."""
    prompt = [dict(m) for m in pair.prompt]
    prompt_ids = _chat_ids(tokenizer, prompt, True)
    fulls = [_chat_ids(tokenizer, prompt + [{"role": "assistant", "content": getattr(pair, s)}], False)
             for s in sides]
    eos = tokenizer.eos_token_id
    if reply_eos and eos is not None:
        fulls = [f if f and f[-1] == eos else [*f, eos] for f in fulls]
    start = min(common_prefix(prompt_ids, f) for f in fulls)
    rows = []
    for full in fulls:
        mask = [0] * start + [1] * (len(full) - start)
        ids = list(full)
        if max_length is not None:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, mask = ids[cut], mask[cut]
        rows.append(Row(tuple(ids), tuple(mask)))
    return rows


class LogProbModel:
    """Summed log-probs of the scored tokens of rows, through a (PEFT-wrapped) causal LM.

    Runs the decoder once and the LM head only at positions that predict a scored token (as the
    engine does), so a batch costs what a training step's forward costs, minus most of the head.
    """

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        self.head = base.get_output_embeddings()
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.pad_id = pad_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batch(self, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, attention mask and scored-token mask of rows."""
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row.ids)] = torch.tensor(row.ids)
            attn[b, :len(row.ids)] = 1
            scored[b, :len(row.ids)] = torch.tensor(row.mask)
        scored[:, 0] = 0  # the first token has no predictor
        return ids, attn, scored

    def __call__(self, rows: Sequence[Row], input_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """Per-row summed log-prob (float32, differentiable when the model's graph is)."""
        return self.forward(*self.batch(rows), input_hook=input_hook)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, scored: torch.Tensor,
                input_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Per-row Σ log p(ids[t] | ids[<t]) over positions with ``scored[t] = 1``."""
        dev = self.device
        embeds = self.decoder.get_input_embeddings()(ids.to(dev))
        if input_hook is not None:
            embeds = input_hook(embeds)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=attn.to(dev), use_cache=False).last_hidden_state
        which, where = torch.nonzero(scored, as_tuple=True)
        out = torch.zeros(ids.shape[0], dtype=torch.float32, device=dev)
        if len(which) == 0:
            return out
        which, where = which.to(dev), where.to(dev)
        logits = self.head(hidden[which, where - 1]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        target = ids.to(dev)[which, where]
        token = logits.gather(1, target[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return out.index_add(0, which, token)


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class KLBaseline:
    """What rebuilds TRL's KTO KL batches: the row order (``align.recipes.kto_row_order`` with
    ``seed``) and ``batch_size`` rows per batch, each row's prompt paired with the previous row's reply."""

    seed: int
    batch_size: int


@dataclass(frozen=True)
class Objective:
    """A stage's per-pair loss and margin as functions of side log-probs.

    ``loss`` and ``margin`` take dicts of per-pair tensors: ``s`` (side log-probs), ``n`` (scored
    token counts) and ``ref`` (reference side log-probs; zeros when unused), keyed by side name.
    """

    method: str
    sides: tuple[str, ...]
    needs_reference: bool
    beta: float
    loss_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
    margin_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
    description: str
    reply_eos: bool = False  # the trainer appends EOS to each reply (TRL's ORPO and CPO)
    kl_baseline: KLBaseline | None = None  # KTO's ``kto`` loss: how TRL forms its KL batches

    def encode(self, tokenizer: Any, pair: Any, max_length: int | None, truncation_mode: str) -> list[Row]:
        """The pair's rows, one per side, as this objective's trainer tokenises them (a ``prompt``
        side: the chosen row's prompt tokens, each scored)."""
        replies = [side for side in self.sides if side != PROMPT_SIDE]
        rows = encode_pair(tokenizer, pair, replies, max_length, truncation_mode, self.reply_eos)
        if PROMPT_SIDE in self.sides:
            start = rows[0].reply_start  # the chosen row's prompt
            rows.append(Row(rows[0].ids[:start], (1,) * start))
        return rows

    def coefficients(self, s: dict[str, torch.Tensor], n: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
                     ) -> dict[str, dict[str, torch.Tensor]]:
        """Per-pair ∂loss/∂s_side and ∂margin/∂s_side (each pair's loss depends on its own s only),
        plus the loss and margin values."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, fn in (("loss", self.loss_fn), ("margin", self.margin_fn)):
            leaves = {k: v.detach().double().clone().requires_grad_(True) for k, v in s.items()}
            value = fn(leaves, {k: v.double() for k, v in n.items()}, {k: v.double() for k, v in ref.items()})
            grads = torch.autograd.grad(value.sum(), [leaves[k] for k in self.sides], allow_unused=True)
            out[name] = {k: (g if g is not None else torch.zeros_like(leaves[k])).detach()
                         for k, g in zip(self.sides, grads)}
            out[name]["value"] = value.detach()
        return out


def _dpo_losses(loss_types: list[str], weights: list[float], beta: float) -> Callable[..., torch.Tensor]:
    def loss(s: dict[str, torch.Tensor], n: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
        delta = (s["chosen"] - ref["chosen"]) - (s["rejected"] - ref["rejected"])
        total = torch.zeros_like(delta)
        for kind, w in zip(loss_types, weights):
            if kind == "sigmoid":
                total = total + w * -F.logsigmoid(beta * delta)
            elif kind == "hinge":
                total = total + w * torch.relu(1 - beta * delta)
            else:  # ipo: per-token averaged log-ratios (TRL's normalisation)
                h = (s["chosen"] - ref["chosen"]) / n["chosen"].clamp(min=1) - \
                    (s["rejected"] - ref["rejected"]) / n["rejected"].clamp(min=1)
                total = total + w * (h - 1 / (2 * beta)) ** 2
        return total
    return loss


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def objective_from_summary(summary: dict[str, Any]) -> Objective:
    """The objective a finished stage trained with, from its ``summary.json``."""
    from alignscope.align.config import StageConfig

    method = summary.get("method")
    if method not in SUPPORTED_METHODS:
        raise InputError(f"attribution does not support method {method!r} yet (stage summary); supported: "
                         f"{', '.join(SUPPORTED_METHODS)}")
    stage = StageConfig(**summary["config"])
    bad = [k for k in _UNSUPPORTED_TRL_KEYS if k in stage.trl]
    if bad:
        raise InputError(f"attribution does not support the TRL option trl.{bad[0]} of this {method} stage; "
                         "retrain without it to attribute")
    beta = float(stage.resolved("beta") or 0.0)
    if method == "sft":
        return Objective("sft", ("chosen",), False, beta, lambda s, n, r: -s["chosen"],
                         lambda s, n, r: s["chosen"], "token cross-entropy of the chosen reply (summed)")
    if method in ("dpo", "ipo"):
        types = list(stage.resolved("loss_type"))
        unknown = [t for t in types if t not in _DPO_LOSSES]
        if unknown:
            raise InputError(f"attribution does not support DPO loss_type {unknown[0]!r}; supported: "
                             f"{', '.join(_DPO_LOSSES)}")
        weights = list(stage.loss_weights or [1.0] * len(types))
        if types == ["ipo"]:
            def margin(s: dict, n: dict, r: dict) -> torch.Tensor:
                return (s["chosen"] - r["chosen"]) / n["chosen"].clamp(min=1) - \
                    (s["rejected"] - r["rejected"]) / n["rejected"].clamp(min=1)
        else:
            def margin(s: dict, n: dict, r: dict) -> torch.Tensor:
                return beta * ((s["chosen"] - r["chosen"]) - (s["rejected"] - r["rejected"]))
        return Objective(method, ("chosen", "rejected"), True, beta, _dpo_losses(types, weights, beta), margin,
                         f"{'+'.join(types)} loss, beta={beta}, cached reference log-probs")
    if method == "orpo":
        def log_odds(s: dict, n: dict, r: dict) -> torch.Tensor:
            c = s["chosen"] / n["chosen"].clamp(min=1)
            j = s["rejected"] / n["rejected"].clamp(min=1)
            return (c - j) - (_log1mexp(c) - _log1mexp(j))

        def orpo(s: dict, n: dict, r: dict) -> torch.Tensor:  # NLL: prompt + chosen, batch token mean (module doc)
            nll = -(s[PROMPT_SIDE] + s["chosen"]) / n["mean_nll"].clamp(min=1)
            return nll - beta * F.logsigmoid(log_odds(s, n, r))
        return Objective("orpo", ("chosen", "rejected", PROMPT_SIDE), False, beta, orpo, log_odds,
                         f"ORPO: NLL of prompt and chosen reply (token mean over the batch) − beta·log σ(log-odds "
                         f"ratio), beta={beta}", reply_eos=True)
    if method == "simpo":
        gamma, smoothing = stage.simpo_gamma, stage.label_smoothing

        def simpo_margin(s: dict, n: dict, r: dict) -> torch.Tensor:  # CPO: per-token averaged log-probs
            return beta * (s["chosen"] / n["chosen"].clamp(min=1) - s["rejected"] / n["rejected"].clamp(min=1)) \
                - gamma

        def simpo(s: dict, n: dict, r: dict) -> torch.Tensor:
            m = simpo_margin(s, n, r)
            return -(1 - smoothing) * F.logsigmoid(m) - smoothing * F.logsigmoid(-m)
        return Objective("simpo", ("chosen", "rejected"), False, beta, simpo, simpo_margin,
                         f"SimPO: −log σ(beta·Δ(mean token log-prob) − gamma), beta={beta}, gamma={gamma}, "
                         f"label_smoothing={smoothing}", reply_eos=True)
    # kto
    kind = stage.resolved("loss_type")
    dw, uw = stage.desirable_weight, stage.undesirable_weight

    def kto(s: dict, n: dict, r: dict) -> torch.Tensor:
        lc, lr = s["chosen"] - r["chosen"], s["rejected"] - r["rejected"]
        if kind == "apo_zero_unpaired":
            return dw * (1 - torch.sigmoid(beta * lc)) + uw * torch.sigmoid(beta * lr)
        kl = n["kl"]  # TRL's detached batch estimate: a constant here too
        return dw * (1 - torch.sigmoid(beta * (lc - kl))) + uw * (1 - torch.sigmoid(beta * (kl - lr)))
    baseline = KLBaseline(stage.seed, stage.per_device_train_batch_size) if kind == "kto" else None
    about_kl = ", KL baseline: TRL's batch estimate at the attributed weights" if baseline else ""
    return Objective("kto", ("chosen", "rejected"), True, beta, kto,
                     lambda s, n, r: beta * ((s["chosen"] - r["chosen"]) - (s["rejected"] - r["rejected"])),
                     f"KTO ({kind}), beta={beta}{about_kl}", kl_baseline=baseline)


def token_counts(objective: Objective, rows: dict[str, Sequence[Row]]) -> dict[str, Any]:
    """The ``n`` the losses read, per pair: each side's scored-token count, and ``mean_nll``, the mean
    over all the given pairs of the tokens an NLL term covers (prompt and chosen reply where there is
    a prompt side; ORPO's batch token mean, module docstring)."""
    import numpy as np

    n = {side: np.array([r.n_scored for r in rows[side]], dtype=np.float64) for side in objective.sides}
    nll = n["chosen"] + n.get(PROMPT_SIDE, 0.0)
    n["mean_nll"] = np.full(len(nll), nll.mean() if len(nll) else 0.0)
    return n
