"""EK-FAC / K-FAC influence through kronfluence, on the same objective and measurement.

kronfluence (Grosse et al. 2023's implementation) needs a ``Task``: the summed training loss of a
batch and the measurement of a query batch. Both are built from the same pieces as the rest of
attribution — ``Objective.encode`` + ``Objective.loss_fn`` for training pairs, the engine's tokenisation
for measurement requests — so its scores are comparable with ours. Tracked modules are the LoRA A
and B linears. Two settings matter (checked against hand-computed gradients, see DESIGN.md):
``has_shared_parameters=True`` because a pair runs the model twice (chosen and rejected), and
per-sample-gradient post-processing switched on (identity), without which its pairwise scores
keep only one of the two passes. The empirical Fisher is used (a preference loss has no natural
label distribution to sample from).

kronfluence's convention is the opposite of ours (its score ∇fᵀH⁻¹∇L_i is positive when
up-weighting pair i *decreases* f), so scores are negated here.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from alignscope.attribute.objective import LogProbModel, Objective, Row
from alignscope.errors import InputError


def _pad(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row.ids)] = torch.tensor(row.ids)
        attn[b, :len(row.ids)] = 1
        scored[b, 1:len(row.ids)] = torch.tensor(row.mask[1:])
    return ids, attn, scored


class _Examples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


def _collate(pad_id: int) -> Any:
    """Rows side-major ([all chosen; all rejected]), padded to the batch's longest."""
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [ex["rows"][k] for k in range(len(batch[0]["rows"])) for ex in batch]
        ids, attn, scored = _pad(rows, pad_id)
        out: dict[str, Any] = {"ids": ids, "attn": attn, "scored": scored}
        if len(batch[0]["rows"]) > 1:
            out["n_sides"] = len(batch[0]["rows"])
        for key in ("ref", "n", "weight"):
            if key in batch[0]:
                out[key] = torch.tensor([ex[key] for ex in batch], dtype=torch.float64)
        return out
    return collate


def _task(objective: Objective, lp_factory: Any, tracked: list[str], n_keys: list[str]) -> Any:
    from kronfluence.task import Task

    class PairTask(Task):
        enable_post_process_per_sample_gradient = True  # see the module docstring

        def _side_values(self, batch: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
            # One forward per side with B rows each: kronfluence's per-sample gradients follow the
            # batch dimension, so the two passes of a pair must be two calls (shared parameters).
            lp = lp_factory(model)
            split = [t.chunk(len(objective.sides)) for t in (batch["ids"], batch["attn"], batch["scored"])]
            return {side: lp.forward(*(part[k] for part in split)).double()
                    for k, side in enumerate(objective.sides)}

        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
            s = self._side_values(batch, model)
            n = {key: batch["n"][:, k] for k, key in enumerate(n_keys)}
            ref = {side: batch["ref"][:, k].to(s[side].device) for k, side in enumerate(objective.sides)}
            return objective.loss_fn(s, n, ref).sum().float()

        def compute_measurement(self, batch: Any, model: Any) -> torch.Tensor:
            values = lp_factory(model).forward(batch["ids"], batch["attn"], batch["scored"]).double()
            return (values * batch["weight"].to(values.device)).sum().float()

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            # one mask serves both passes: the union, so a pair's shorter side adds a few pad
            # activations to the activation covariance (its gradients there are zero)
            return torch.stack(batch["attn"].chunk(batch["n_sides"])).amax(dim=0) if "n_sides" in batch \
                else batch["attn"]

        def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
            return gradient

    return PairTask()


def kronfluence_scores(lm: Any, pairs: Sequence[Any], objective: Objective, requests: Sequence[Any],
                       weights: Sequence[float], *, config: Any, reference: pd.DataFrame | None, strategy: str,
                       work: Path, train_batch: int = 8, query_batch: int = 16, layers: str = "all") -> np.ndarray:
    """Per-pair EK-FAC/K-FAC influence on f in our sign convention (positive = makes f worse), over the
    LoRA weights of the selected ``layers`` (the same ones our own gradients cover)."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as exc:
        raise InputError("--method ekfac/kfac needs kronfluence: pip install --no-deps kronfluence==1.0.1 einops "
                         "einconv opt_einsum") from exc
    from alignscope.attribute.gradients import loss_inputs, measurement_rows, reference_logprobs, trained_linears

    pad_id = lm.tokenizer.pad_token_id or 0
    model = lm.model
    model.eval()
    encoded = [objective.encode(lm.tokenizer, p, config.max_length, config.truncation_mode) for p in pairs]
    rows = {side: [e[k] for e in encoded] for k, side in enumerate(objective.sides)}
    counts = loss_inputs(objective, LogProbModel(model, pad_id), lm.tokenizer, pairs, rows, config.max_length, 4096)
    ref = np.zeros((len(pairs), len(objective.sides)))
    if objective.needs_reference:
        table = reference.set_index("id") if reference is not None else None
        if table is not None and all(p.id in table.index for p in pairs):
            ref[:, 0] = table.loc[[p.id for p in pairs], "ref_chosen_logps"].to_numpy()
            ref[:, 1] = table.loc[[p.id for p in pairs], "ref_rejected_logps"].to_numpy()
        else:
            computed = reference_logprobs(LogProbModel(model, pad_id), rows, 4096)
            ref = np.stack([computed[s] for s in objective.sides], axis=1)
    keys = list(counts)  # the sides' counts first, then extras; compute_train_loss reads them back in this order
    train = _Examples([{"rows": e, "ref": ref[i].tolist(), "n": [float(counts[key][i]) for key in keys]}
                       for i, e in enumerate(encoded)])
    query = _Examples([{"rows": [row], "weight": float(w)}
                       for row, w in zip(measurement_rows(lm, requests), weights)])
    tracked = [name for name, _ in trained_linears(model, layers)]  # module paths: ...q_proj.lora_A.default
    task = _task(objective, lambda m: LogProbModel(m, pad_id), tracked, keys)
    out_dir = work / uuid.uuid4().hex[:8]
    prepared = prepare_model(model, task)
    try:
        logging.getLogger("kronfluence").setLevel(logging.WARNING)
        analyzer = Analyzer(analysis_name="alignscope", model=prepared, task=task, cpu=not torch.cuda.is_available(),
                            disable_tqdm=True, output_dir=str(out_dir))
        kwargs = DataLoaderKwargs(collate_fn=_collate(pad_id))
        analyzer.set_dataloader_kwargs(kwargs)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True, has_shared_parameters=True)
        analyzer.fit_all_factors("factors", dataset=train, per_device_batch_size=train_batch, factor_args=factor_args,
                                 overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=None, aggregate_query_gradients=True)
        analyzer.compute_pairwise_scores("scores", "factors", query_dataset=query, train_dataset=train,
                                         per_device_query_batch_size=query_batch,
                                         per_device_train_batch_size=train_batch, score_args=score_args,
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    finally:
        _unwrap(model)
        shutil.rmtree(out_dir, ignore_errors=True)
    return -scores.sum(axis=0)


def _unwrap(model: Any) -> None:
    """Put the original linears back (kronfluence wraps them in place) so the model is reusable."""
    from kronfluence.module.tracked_module import TrackedModule

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TrackedModule):
                setattr(module, child_name, child.original_module)
    del name
