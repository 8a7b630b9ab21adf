"""Per-example gradients of the trained weights, batched, optionally projected, stored memory-mapped.

Which weights: the LoRA ``lora_A``/``lora_B`` linears of an adapter, or, for a fully fine-tuned
stage, the linears of the transformer blocks (``trained_linears``); "LoRA weights" below covers both.

How: every such linear gets a forward hook that keeps its input ``x`` and
registers a hook on its output, which receives the output gradient ``g`` during backward. A
weight's gradient for one sequence is ``Σ_t g_t xᵀ_t``, so ``einsum('bto,bti->boi')`` gives every
row's gradient from one forward and one backward of the batch — what a training step costs,
because rows never interact (right padding, causal attention), so the gradient of the batch *sum*
restricted to one row is that row's own gradient. The LoRA weights themselves are frozen during
collection (only activations carry gradients), so autograd never builds the summed weight grads.

Projection (``project_dim``) is Kronecker-structured per layer, LoGra style: ``P_out G P_inᵀ`` =
``Σ_t (P_out g_t)(P_in x_t)ᵀ``, i.e. the activations and output grads are projected *before* the
outer product, with seeded Gaussian (or Rademacher) matrices scaled by 1/√k so dot products are
preserved in expectation. Layers stay separate (DataInf's damping is per layer).

K-FAC factors (``factors=True``, for the one-pass EK-FAC estimator): the same hooks also add up,
per layer, ``A = Σ_t x_t x_tᵀ`` and ``S = Σ_t g_t g_tᵀ`` over the tokens that carry gradient (in the
projected space when projecting). They come from the backward of the per-side log-probs, i.e. the
completions' own log-likelihood; the estimator takes only their eigenbases from them and fits the
eigenvalues on the stored per-pair *loss* gradients (``estimators.ekfac_onepass``). This is what lets
EK-FAC run on the one pass that collects gradients, where kronfluence makes three.

Layer selection (``layers``: ``all``, ``last:N``, ``last:P%``): only the LoRA weights of the last
blocks get hooks, and a forward pre-hook on the first selected block turns its input hidden states
into the leaf that needs a gradient, so the blocks before it run without a graph and the backward
ends there. The selected weights get exactly the gradients a full backward would give them.

Storage: ``RUN/.work/gradients/<key>/`` holds ``chosen.npy`` / ``rejected.npy`` (pairs × dims,
float32, ``numpy.lib.format.open_memmap``) written chunk by chunk; a chunk's coefficient table
``coef-<chunk>.parquet`` is written (atomically) only after its rows are flushed, so it doubles as
the chunk's done-marker and an interrupted collection resumes at the first missing chunk (with
factors, the chunk's sums go to ``factors-<chunk>.npz`` before its marker). Chunks
are dealt round-robin to ``accelerate`` processes, which write disjoint rows of the same files.
The finished set is renamed into ``RUN/gradients/<key>/``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from alignscope.attribute.objective import KLBaseline, LogProbModel, Objective, Row, encode_pair, token_counts
from alignscope.errors import InputError
from alignscope.models.hf_backend import token_batches
from alignscope.store import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_parquet

GRADIENT_STAGE = "gradients"
MAX_ROWS = 64  # rows per backward pass: bounds the per-row activation copies the hooks keep
LAYERS_FILE = "layers.json"
TABLE_FILE = "pairs.parquet"
FACTORS_FILE = "factors.npz"


# --------------------------------------------------------------------------- layers and projection


@dataclass
class Layer:
    """One LoRA weight: its gradient's shape, its projection, and where it sits in a flat row."""

    name: str
    shape: tuple[int, int]  # (out, in) of the weight
    proj: tuple[int, int]  # (k_out, k_in) after projection (== shape when not projected)
    offset: int = 0

    @property
    def size(self) -> int:
        return self.proj[0] * self.proj[1]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "proj": list(self.proj), "offset": self.offset}


def _projected_shape(out: int, inp: int, k: int) -> tuple[int, int]:
    """Keep a side that is already small, project the other; both when neither is small."""
    if out * inp <= k:
        return out, inp
    small = min(out, inp)
    if small * 2 <= k:
        other = max(1, k // small)
        return (out, other) if out == small else (other, inp)
    side = max(1, math.isqrt(k))
    return min(out, side), min(inp, side)


def _matrix(rows: int, cols: int, seed: int, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        m = torch.randint(0, 2, (rows, cols), generator=gen).float() * 2 - 1
    else:
        m = torch.randn(rows, cols, generator=gen)
    return m / math.sqrt(rows)


ALL_LAYERS = "all"
_BLOCK = re.compile(r"^(.*?\.(\d+))\.")  # "...model.layers.14.self_attn.q_proj..." -> (prefix, 14)


def check_layers(spec: str | None) -> str:
    """Normalise a layer selection: ``all``, ``last:N`` (the N last blocks) or ``last:P%``.

    Why a selection at all: on the default study each early block's part of the score ranks the
    planted pairs near chance (block-wise AUC 0.37–0.66 for blocks 0–16 of 30, seed 0) while the later
    blocks' parts reach 0.79–0.91, so summing the early ones adds noise; and stopping the backward at
    the first selected block makes every gradient cheaper (BENCHMARKS.md, session 8).
    """
    text = ALL_LAYERS if spec is None else str(spec).strip().lower()
    if text == ALL_LAYERS:
        return text
    match = re.fullmatch(r"last:(\d+)(%?)", text)
    if match is None or int(match.group(1)) < 1 or (match.group(2) and int(match.group(1)) > 100):
        raise InputError(f"layers {spec!r}: use all, last:N (the N last transformer blocks) or last:P% "
                         "(that share of them, 1-100)")
    return text


def _select_blocks(blocks: Sequence[int], spec: str) -> set[int]:
    """The block indices a checked ``last:…`` selection keeps, out of the LoRA-adapted ``blocks``."""
    value, share = int(spec[5:].rstrip("%")), spec.endswith("%")
    keep = max(1, math.ceil(len(blocks) * value / 100)) if share else value
    if keep > len(blocks):
        raise InputError(f"layers {spec}: the model has {len(blocks)} LoRA-adapted blocks; use last:{len(blocks)} "
                         "or fewer")
    return set(sorted(blocks)[-keep:])


def trained_linears(model: Any, layers: str = ALL_LAYERS) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the linears whose weights attribution differentiates, in the selected blocks,
    in model order: every active LoRA A and B linear of an adapter, or, for a model without LoRA (a
    fully fine-tuned stage), every linear inside the numbered transformer blocks. The latter leaves
    out embeddings, norms and the output head, which full fine-tuning also trained: the scores then
    cover the blocks' weight matrices, most of the trained parameters, and the summary says so."""
    found = []
    for name, module in model.named_modules():
        parts = getattr(module, "lora_A", None)
        if not isinstance(parts, torch.nn.ModuleDict):
            continue
        for adapter in module.active_adapters:
            if adapter in parts:
                found.append((f"{name}.lora_A.{adapter}", module.lora_A[adapter]))
                found.append((f"{name}.lora_B.{adapter}", module.lora_B[adapter]))
    if not found:
        found = [(name, module) for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and _BLOCK.match(name)]
    if not found:
        raise InputError("attribution needs LoRA layers or linear layers inside numbered transformer blocks "
                         "(model.layers.<i>...); this model has neither")
    spec = check_layers(layers)
    if spec == ALL_LAYERS:
        return found
    matches = [_BLOCK.match(name) for name, _ in found]
    outside = [name for (name, _), m in zip(found, matches) if m is None]
    if outside:
        raise InputError(f"layers {spec}: weight {outside[0]} sits outside the numbered transformer blocks; "
                         "use layers all for this adapter")
    blocks = [int(m.group(2)) for m in matches if m is not None]
    keep = _select_blocks(sorted(set(blocks)), spec)
    return [item for item, block in zip(found, blocks) if block in keep]


def first_block(model: Any, modules: Sequence[tuple[str, Any]]) -> torch.nn.Module:
    """The transformer block holding the first of ``modules`` (where a layer selection's backward stops)."""
    match = _BLOCK.match(modules[0][0])
    assert match is not None
    return model.get_submodule(match.group(1))


class WeightGradients:
    """Per-row gradients of the trained linears' weights of ``model`` (``trained_linears``; see the
    module docstring)."""

    def __init__(self, model: Any, project_dim: int | None = None, seed: int = 0,
                 projection: str = "gaussian", factors: bool = False, layers: str = ALL_LAYERS) -> None:
        if project_dim is not None and project_dim < 1:
            raise InputError(f"--project-dim {project_dim}: must be a positive number of dimensions")
        if projection not in ("gaussian", "rademacher"):
            raise InputError(f"projection {projection!r}: use gaussian or rademacher")
        self.model = model
        spec = check_layers(layers)
        self.modules = trained_linears(model, spec)
        # A selection of blocks starts the backward at its first block's input, not at the embeddings.
        self._start = None if spec == ALL_LAYERS else first_block(model, self.modules)
        self.layers: list[Layer] = []
        self._proj: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        per_layer = None if project_dim is None else max(1, project_dim // len(self.modules))
        offset = 0
        for index, (name, module) in enumerate(self.modules):
            shape = (module.weight.shape[0], module.weight.shape[1])
            proj = shape if per_layer is None else _projected_shape(*shape, per_layer)
            p_out = None if proj[0] == shape[0] else _matrix(proj[0], shape[0], seed * 100_003 + 2 * index, projection)
            p_in = None if proj[1] == shape[1] else _matrix(proj[1], shape[1], seed * 100_003 + 2 * index + 1,
                                                            projection)
            self._proj[name] = (p_out, p_in)
            self.layers.append(Layer(name, shape, proj, offset))
            offset += proj[0] * proj[1]
        self.dim = offset
        self._buffers: dict[str, torch.Tensor] = {}
        self.track_factors = factors
        self._factors: dict[str, list[torch.Tensor]] = {}

    def describe(self) -> list[dict[str, Any]]:
        return [layer.to_dict() for layer in self.layers]

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """Hooks on, LoRA weights frozen (restored afterwards)."""
        handles = [module.register_forward_hook(self._forward_hook(name)) for name, module in self.modules]
        if self._start is not None:
            handles.append(self._start.register_forward_pre_hook(_leaf_hidden_states, with_kwargs=True))
        frozen = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in frozen.items():
                p.requires_grad_(flag)

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0]
            output.register_hook(lambda g: self._record(name, x, g))
        return hook

    def _record(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        p_out, p_in = self._proj[name]
        x, g = x.float(), g.float()
        if p_in is not None:
            x = x @ p_in.to(x.device).T
        if p_out is not None:
            g = g @ p_out.to(g.device).T
        grad = torch.einsum("bto,bti->boi", g, x).reshape(x.shape[0], -1)
        self._buffers[name] = self._buffers[name] + grad if name in self._buffers else grad
        if self.track_factors:
            self._add_factors(name, x, g)

    def _add_factors(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """K-FAC sums over the tokens whose output gradient is non-zero: padding and tokens that
        influence no scored position add nothing to a gradient, so they add nothing here either."""
        carries = (g.abs().amax(dim=-1, keepdim=True) > 0).to(x.dtype)
        xs, gs = (x * carries).reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        a, s = (xs.T @ xs).double(), (gs.T @ gs).double()  # float32 products, float64 running sums
        if name in self._factors:
            self._factors[name][0] += a
            self._factors[name][1] += s
        else:
            self._factors[name] = [a, s]

    def take_factors(self) -> dict[str, np.ndarray]:
        """The K-FAC sums since the last call (``a<k>``/``s<k>`` for layer k), and reset them."""
        out: dict[str, np.ndarray] = {}
        for k, layer in enumerate(self.layers):
            a, s = self._factors.get(layer.name, (None, None))
            out[f"a{k}"] = np.zeros((layer.proj[1],) * 2) if a is None else a.cpu().numpy()
            out[f"s{k}"] = np.zeros((layer.proj[0],) * 2) if s is None else s.cpu().numpy()
        self._factors = {}
        return out

    def per_row(self, forward: Callable[[Callable[[torch.Tensor], torch.Tensor] | None], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, gradients): ``forward(input_hook)`` returns per-row values; their per-row
        gradients come back as a (rows, dim) float32 matrix in layer order. ``input_hook`` (for the
        embeddings) is None under a layer selection, whose first block makes its own leaf."""
        self._buffers = {}
        with self.hooked():
            values = forward(_leaf if self._start is None else None)
            values.sum().backward()
        rows = values.shape[0]
        parts = [self._buffers.get(layer.name, torch.zeros(rows, layer.size)) for layer in self.layers]
        self._buffers = {}
        return values.detach(), torch.cat([p.cpu() for p in parts], dim=1)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    """Where the backward stops: a fresh leaf that needs a gradient, so only later weights get one."""
    return tensor.detach().requires_grad_(True)


def _leaf_hidden_states(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook on a layer selection's first block: its input hidden states become the leaf,
    so no graph is kept for the blocks before it and the backward ends there."""
    if args:
        return (_leaf(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _leaf(kwargs["hidden_states"])}


# --------------------------------------------------------------------------- batching


# --------------------------------------------------------------------------- pair gradients


@dataclass
class GradientSet:
    """A finished (or in-progress) set of per-pair side gradients and per-pair coefficients."""

    path: Path
    layers: list[Layer]
    sides: tuple[str, ...]
    table: pd.DataFrame = field(repr=False)

    @classmethod
    def open(cls, path: Path) -> GradientSet:
        meta = json.loads((path / LAYERS_FILE).read_text())
        layers = [Layer(x["name"], tuple(x["shape"]), tuple(x["proj"]), x["offset"]) for x in meta["layers"]]
        return cls(path, layers, tuple(meta["sides"]), pd.read_parquet(path / TABLE_FILE))

    @property
    def dim(self) -> int:
        return sum(layer.size for layer in self.layers)

    def side(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy", mmap_mode="r")

    def coef(self, kind: str, side: str) -> np.ndarray:
        """Per-pair ∂(loss|margin)/∂s_side."""
        return self.table[f"{kind}_coef_{side}"].to_numpy(np.float64)

    def factors(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per-layer K-FAC sums (A over inputs, S over output gradients), if collected."""
        path = self.path / FACTORS_FILE
        if not path.exists():
            return None
        with np.load(path) as data:
            return [(data[f"a{k}"], data[f"s{k}"]) for k in range(len(self.layers))]


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic ``.npz`` (plain arrays only: read back with ``allow_pickle=False``, numpy's default)."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _reference_columns(objective: Objective, pairs: Sequence[Any], reference: pd.DataFrame | None
                       ) -> dict[str, np.ndarray] | None:
    if not objective.needs_reference or reference is None:
        return None
    by_id = reference.set_index("id")
    missing = [p.id for p in pairs if p.id not in by_id.index]
    if missing:
        return None
    rows = by_id.loc[[p.id for p in pairs]]
    return {"chosen": rows["ref_chosen_logps"].to_numpy(np.float64),
            "rejected": rows["ref_rejected_logps"].to_numpy(np.float64)}


def reference_logprobs(lp: LogProbModel, rows: dict[str, list[Row]], batch_tokens: int) -> dict[str, np.ndarray]:
    """Side log-probs with the adapter disabled (the base = the DPO/KTO reference when no cache)."""
    model = lp.model
    if not hasattr(model, "disable_adapter"):  # the policy itself would stand in for the reference
        raise InputError("the stage has no reference log-prob cache, and a model without an adapter cannot "
                         "recompute one (the reference is the model before training); retrain the stage with "
                         "precompute_ref_log_probs: true")
    with model.disable_adapter():
        return side_logprobs(lp, rows, batch_tokens)


def side_logprobs(lp: LogProbModel, rows: dict[str, list[Row]], batch_tokens: int) -> dict[str, np.ndarray]:
    """Summed log-probs of each side's rows under ``lp``'s model as it is, without a graph."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for side, side_rows in rows.items():
            values = np.zeros(len(side_rows))
            for batch in token_batches([len(r.ids) for r in side_rows], batch_tokens, MAX_ROWS):
                values[batch] = lp([side_rows[i] for i in batch]).double().cpu().numpy()
            out[side] = values
    return out


def loss_inputs(objective: Objective, lp: LogProbModel, tokenizer: Any, pairs: Sequence[Any],
                rows: dict[str, list[Row]], max_length: int | None, batch_tokens: int) -> dict[str, np.ndarray]:
    """Per pair, the ``n`` the objective's loss reads: token counts (``token_counts``) and, for KTO's
    ``kto`` loss, its KL baseline at the model's current weights (``kto_kl``)."""
    n = token_counts(objective, rows)
    if objective.kl_baseline is not None:
        n["kl"] = np.full(len(pairs), kto_kl(lp, tokenizer, pairs, objective.kl_baseline, max_length, batch_tokens))
    return n


def kto_kl(lp: LogProbModel, tokenizer: Any, pairs: Sequence[Any], baseline: KLBaseline, max_length: int | None,
           batch_tokens: int = 4096) -> float:
    """KTO's KL baseline as TRL 1.16 estimates it, at ``lp``'s weights, averaged over its batches.

    TRL's rows come in ``kto_row_order``; rows whose prompt fills ``max_length`` are dropped; each
    batch of ``batch_size`` rows pairs row j's prompt with row j−1's reply (the first with the last),
    cut to ``max_length``. A batch's estimate is the mean of (policy − reference) log-probs of those
    replies, at least 0. TRL uses each batch's own at every step; attribution takes their mean.
    """
    from alignscope.align.recipes import kto_row_order

    if not hasattr(lp.model, "disable_adapter"):
        raise InputError("KTO's kto loss subtracts a KL baseline computed against the reference model, which a "
                         "fully fine-tuned stage does not keep; attribute a LoRA stage, or train with loss_type "
                         "apo_zero_unpaired (no KL term)")
    parts = []
    for i, desirable in kto_row_order(len(pairs), baseline.seed):
        row = encode_pair(tokenizer, pairs[i], ["chosen" if desirable else "rejected"], None)[0]
        start = row.reply_start
        if max_length is None or start < max_length:
            parts.append((row.ids[:start], row.ids[start:]))
    batches = [parts[b:b + baseline.batch_size] for b in range(0, len(parts), baseline.batch_size)]
    mismatched = []
    for batch in batches:
        replies = [batch[-1][1]] + [reply for _, reply in batch[:-1]]
        for (prompt, _), reply in zip(batch, replies, strict=True):
            ids, mask = (prompt + reply)[:max_length], ((0,) * len(prompt) + (1,) * len(reply))[:max_length]
            mismatched.append(Row(tuple(ids), tuple(mask)))
    policy = side_logprobs(lp, {"kl": mismatched}, batch_tokens)["kl"]
    reference = reference_logprobs(lp, {"kl": mismatched}, batch_tokens)["kl"]
    gaps, at = [], 0
    for batch in batches:
        gaps.append(max(float(np.mean(policy[at:at + len(batch)] - reference[at:at + len(batch)])), 0.0))
        at += len(batch)
    return float(np.mean(gaps)) if gaps else 0.0


def _chunk_coefficients(objective: Objective, ids: list[str], s: dict[str, np.ndarray], n: dict[str, np.ndarray],
                        ref: dict[str, np.ndarray]) -> pd.DataFrame:
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in s.items()}
    tn = {k: torch.tensor(v, dtype=torch.float64) for k, v in n.items()}
    tr = {k: torch.tensor(v, dtype=torch.float64) for k, v in ref.items()}
    coef = objective.coefficients(t, tn, tr)
    frame: dict[str, Any] = {"pair_id": ids}
    for side in objective.sides:
        frame[f"logp_{side}"] = s[side]
        frame[f"tokens_{side}"] = n[side]
        frame[f"ref_{side}"] = ref[side]
        frame[f"loss_coef_{side}"] = coef["loss"][side].numpy()
        frame[f"margin_coef_{side}"] = coef["margin"][side].numpy()
    if "kl" in n:  # KTO's KL baseline, the same for every pair
        frame["kl_baseline"] = n["kl"]
    frame["loss"] = coef["loss"]["value"].numpy()
    frame["margin"] = coef["margin"]["value"].numpy()
    return pd.DataFrame(frame)


def _open_side(path: Path, shape: tuple[int, int], create: bool) -> np.memmap:
    if create or not path.exists():
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    arr = np.lib.format.open_memmap(path, mode="r+")
    if arr.shape != shape:
        raise InputError(f"{path}: shape {arr.shape} differs from the expected {shape}; delete {path.parent} "
                         "to restart the gradient collection")
    return arr


def collect_pair_gradients(lm: Any, pairs: Sequence[Any], objective: Objective, *, run: RunDir,
                           inputs: dict[str, Any], max_length: int | None, truncation_mode: str,
                           reference: pd.DataFrame | None, project_dim: int | None, seed: int,
                           batch_tokens: int = 4096, chunk_pairs: int = 64,
                           after_chunk: Callable[[int], None] | None = None, factors: bool = False,
                           layers: str = ALL_LAYERS) -> GradientSet:
    """Per-pair side gradients of the stage's objective, cached as ``RUN/gradients/<key>/``.

    ``inputs`` identify the result (stage, data, projection, precision); a finished key is
    returned as is, an unfinished one resumes at its first missing chunk. ``factors`` also keeps
    the K-FAC sums (``inputs`` must then say so, as they change the artefact). Under ``accelerate
    launch`` the chunks are shared between processes and rank 0 assembles the artefact. ``layers``
    selects the LoRA weights (:func:`check_layers`); ``inputs`` must then say so too.
    """
    from alignscope.models.engine import _distributed_state

    found = run.find(GRADIENT_STAGE, inputs)
    if found is not None:
        return GradientSet.open(found.path)
    state = _distributed_state()
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    work = run.root / ".work" / GRADIENT_STAGE / RunDir.key(inputs)
    work.mkdir(parents=True, exist_ok=True)

    model = lm.model
    model.eval()
    lp = LogProbModel(model, lm.tokenizer.pad_token_id or 0)
    grads = WeightGradients(model, project_dim, seed, factors=factors, layers=layers)
    rows = {side: [] for side in objective.sides}
    for pair in pairs:
        for side, row in zip(objective.sides, objective.encode(lm.tokenizer, pair, max_length, truncation_mode)):
            rows[side].append(row)
    counts = loss_inputs(objective, lp, lm.tokenizer, pairs, rows, max_length, batch_tokens)
    ref = _reference_columns(objective, pairs, reference)
    if objective.needs_reference and ref is None:
        ref = reference_logprobs(lp, rows, batch_tokens)
    if ref is None:
        ref = {side: np.zeros(len(pairs)) for side in objective.sides}

    shape = (len(pairs), grads.dim)
    meta = {"layers": grads.describe(), "sides": list(objective.sides), "n_pairs": len(pairs),
            "chunk_pairs": chunk_pairs, "project_dim": project_dim, "seed": seed}
    fresh = not (work / LAYERS_FILE).exists() or json.loads((work / LAYERS_FILE).read_text()) != meta
    if rank == 0:
        if fresh:
            for old in [*work.glob("coef-*.parquet"), *work.glob("factors-*.npz")]:
                old.unlink()
        for side in objective.sides:
            _open_side(work / f"{side}.npy", shape, fresh).flush()
        atomic_write_json(work / LAYERS_FILE, meta)
    if state is not None:
        state.wait_for_everyone()
    arrays = {side: _open_side(work / f"{side}.npy", shape, False) for side in objective.sides}

    lengths = [sum(len(rows[s][i].ids) for s in objective.sides) for i in range(len(pairs))]
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    chunks = [order[c:c + chunk_pairs] for c in range(0, len(order), chunk_pairs)]
    started = time.perf_counter()
    for c, members in enumerate(chunks):
        marker = work / f"coef-{c:05d}.parquet"
        if c % world != rank or marker.exists():
            continue
        s = {side: np.zeros(len(members)) for side in objective.sides}
        n = {key: value[members] for key, value in counts.items()}
        side_rows = [rows[side][i] for side in objective.sides for i in members]
        local = [len(r.ids) for r in side_rows]
        for batch in token_batches(local, batch_tokens, MAX_ROWS):
            values, g = grads.per_row(lambda hook, b=batch: lp([side_rows[j] for j in b], input_hook=hook))
            for j, value, grad in zip(batch, values.double().cpu().numpy(), g.numpy()):
                side = objective.sides[j // len(members)]
                k = j % len(members)
                s[side][k] = value
                arrays[side][members[k]] = grad
        for arr in arrays.values():
            arr.flush()
        if factors:
            _save_npz(work / f"factors-{c:05d}.npz", grads.take_factors())
        table = _chunk_coefficients(objective, [pairs[i].id for i in members], s, n,
                                    {side: ref[side][members] for side in objective.sides})
        table.insert(0, "index", members)
        atomic_write_parquet(marker, table)
        if after_chunk is not None:
            after_chunk(c)
    elapsed = time.perf_counter() - started
    atomic_write_json(work / f"timing-{rank}.json", {"seconds": elapsed})
    del arrays
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        _finish(run, inputs, work, objective, len(chunks))
    if state is not None:
        state.wait_for_everyone()
    found = run.find(GRADIENT_STAGE, inputs)
    assert found is not None
    return GradientSet.open(found.path)


def _finish(run: RunDir, inputs: dict[str, Any], work: Path, objective: Objective, n_chunks: int) -> None:
    parts = [pd.read_parquet(work / f"coef-{c:05d}.parquet") for c in range(n_chunks)]
    table = pd.concat(parts).sort_values("index").reset_index(drop=True)
    seconds = max(json.loads(p.read_text())["seconds"] for p in work.glob("timing-*.json"))
    with run.build(GRADIENT_STAGE, inputs) as scratch:
        for side in objective.sides:
            os.replace(work / f"{side}.npy", scratch / f"{side}.npy")
        os.replace(work / LAYERS_FILE, scratch / LAYERS_FILE)
        chunk_factors = [work / f"factors-{c:05d}.npz" for c in range(n_chunks)]
        if chunk_factors and chunk_factors[0].exists():
            _save_npz(scratch / FACTORS_FILE, _sum_npz(chunk_factors))
        atomic_write_parquet(scratch / TABLE_FILE, table.drop(columns=["index"]))
        atomic_write_json(scratch / "summary.json", {"n_pairs": len(table), "collect_s": round(seconds, 3),
                                                     "objective": objective.description})
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()


def _sum_npz(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for path in paths:
        with np.load(path) as data:
            for name in data.files:
                total[name] = total[name] + data[name] if name in total else data[name].copy()
    return total


# --------------------------------------------------------------------------- measurement


def measurement_rows(lm: Any, requests: Sequence[Any]) -> list[Row]:
    """Score requests as rows, tokenised by the engine's own code (so f equals the audit's sum)."""
    from alignscope.models.hf_backend import HFBackend

    backend = HFBackend(lm)
    rows = []
    for i, req in enumerate(requests):
        enc = backend.encode_score(i, req)
        rows.append(Row(tuple(enc.prefix) + tuple(enc.continuation),
                        (0,) * len(enc.prefix) + (1,) * len(enc.continuation)))
    return rows


def measurement_gradients(lm: Any, grads: WeightGradients, requests: Sequence[Any], weights: Sequence[float],
                          batch_tokens: int = 4096, summed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs, weighted per-request gradients): f = Σ w·logp and ∇f = Σ rows of the matrix.

    With ``summed`` the gradient part is ∇f itself (one float64 vector), added up batch by batch.
    Why: attribution only needs ∇f, and a measurement can have thousands of requests (the covert
    matched-guise probe scores every adjective after every template for both guises: 5,328 requests
    for 8 text pairs), whose rows would take requests × LoRA dims × 4 bytes (52 GB on the default stage).
    Under ``accelerate launch`` the summed form's batches are dealt to the processes, like the pairs'
    chunks, and every process gets the total.
    """
    from alignscope.models.engine import _distributed_state

    lm.model.eval()
    lp = LogProbModel(lm.model, lm.tokenizer.pad_token_id or 0)
    rows = measurement_rows(lm, requests)
    logps = np.zeros(len(rows))
    out = np.zeros(grads.dim) if summed else np.zeros((len(rows), grads.dim), dtype=np.float32)
    w = np.asarray(weights, dtype=np.float64)
    batches = list(token_batches([len(r.ids) for r in rows], batch_tokens, MAX_ROWS))
    state = _distributed_state() if summed else None  # ∇f is a sum: processes can share its batches
    for batch in batches if state is None else batches[state.process_index::state.num_processes]:
        values, g = grads.per_row(lambda hook, b=batch: lp([rows[j] for j in b], input_hook=hook))
        logps[batch] = values.double().cpu().numpy()
        if summed:
            out += w[batch] @ g.numpy().astype(np.float64)
        else:
            out[batch] = g.numpy() * w[batch, None]
    if state is not None:  # every process gets the whole sum (each left the others' rows at 0)
        from accelerate.utils import gather_object

        parts = gather_object([(logps, out)])
        logps, out = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return logps, out
