"""Method → TRL trainer: datasets in TRL's formats, TRL configs from a ``StageConfig``, LoRA, guards.

Everything here is TRL + PEFT; the only trainer code of our own is

- ``FiniteLossGuard``: stops at the first non-finite loss, *before* the optimizer applies it (TRL's
  ``logging_nan_inf_filter`` would otherwise hide it from the logs), agreeing across processes;
- the reference-cache override of DPO's precompute hook (``alignscope.align.reference``);
- ``completion_positions_only``: TRL's fused LM head scores only the labelled positions on CPU too.

Data per method (all conversational, so the tokenizer's chat template is applied by TRL):

=========  =====================================================================================
sft        ``prompt`` + ``completion`` = the chosen reply (completion-only loss, TRL's default)
dpo, ipo   ``prompt`` / ``chosen`` / ``rejected`` (+ ``id`` for the reference cache)
orpo       ``prompt`` / ``chosen`` / ``rejected`` (``trl.experimental.orpo``)
simpo      same, ``CPOConfig(loss_type="simpo", cpo_alpha=0.0)`` (``trl.experimental.cpo``)
kto        unpaired: every pair gives a desirable (chosen) and an undesirable (rejected) example,
           shuffled with the stage seed so an example's in-batch KL partner is another prompt's
rloo       unique prompts; completions are sampled and scored by a reward from
           ``alignscope.data.synthesis.REWARDS`` (or a reward-model path/hub id)
=========  =====================================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alignscope.align.config import StageConfig
from alignscope.errors import InputError

PAIRWISE = ("dpo", "ipo", "orpo", "simpo")


class NonFiniteLoss(RuntimeError):
    """Raised inside ``training_step`` when a loss is NaN/inf; the optimizer step never happens."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step
        self.value = value


class FiniteLossGuard:
    """Mixin for any ``transformers.Trainer``: raise ``NonFiniteLoss`` on a NaN/inf loss.

    Checked after forward+backward of each micro-batch, before the optimizer step, so the weights
    (and every checkpoint written so far) are the last good ones. Under several processes the flag
    is summed across ranks so all of them stop together instead of one hanging in a collective.
    """

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=loss.device)
        accelerator = self.accelerator  # type: ignore[attr-defined]
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))  # type: ignore[attr-defined]
        return loss


def _guarded(cls: type) -> type:
    return type(f"Guarded{cls.__name__}", (FiniteLossGuard, cls), {})


LOSS_WEIGHT = "loss_weight"


def _backbone(model: Any) -> Any:
    """The transformer under the LM head, through PEFT's wrapper (what TRL's fused head calls)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


class ZeroLossPairs:
    """Mixin for TRL's SFT, DPO/IPO, ORPO, CPO (SimPO) and KTO trainers: rows with ``loss_weight`` 0 keep
    their batch slot but add no gradient.

    Why not drop them: a retrain on fewer pairs also reorders and regroups every other pair, and on
    the default study that alone moves the planted effect up to 2.3× (BENCHMARKS.md, session 11).
    Here the data, its order and its batches stay; only the objective loses the zeroed pairs' terms,
    which is the leave-k-out counterfactual that influence scores estimate.

    How, without copying TRL's losses: in each of these trainers every loss term depends only on its
    own pair's rows, so multiplying the gradient that reaches the backbone's last hidden state, row
    by row, by the pair's weight multiplies that pair's whole contribution to every weight below it:
    the LoRA adapters (``check_zero_loss`` refuses the cases where this is not exact). Rows: SFT has
    one per pair; DPO/IPO, ORPO and SimPO concatenate the chosen rows, then the rejected rows, so the
    weights repeat; KTO has one per reply, and both replies of a pair carry its weight. KTO's KL
    baseline is a forward under ``no_grad``, detached: the zeroed replies still enter its value (they
    are still in the batch) but pass no gradient through it.

    Normalisers stay as they are: the zeroed terms are multiplied by 0 inside the same mean, so DPO,
    ORPO, SimPO and KTO still divide by every pair / reply of the batch, and SFT (like ORPO's NLL
    term) by every labelled token of the batch, the zeroed rows' included. The forward pass, and so
    the logged loss, are untouched.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "aux_loss_enabled", False):  # computed from router logits, so the hook misses it
            raise InputError("zero_loss_pairs: the model's MoE router loss mixes every token of the batch and "
                             "is not scaled per pair; train without it (router_aux_loss_coef 0)")
        collate = self.data_collator  # type: ignore[has-type]

        def with_weights(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            batch[LOSS_WEIGHT] = torch.tensor([float(e[LOSS_WEIGHT]) for e in examples])
            return batch

        self.data_collator = with_weights

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if LOSS_WEIGHT not in self._signature_columns:  # type: ignore[has-type]
            self._signature_columns = [*self._signature_columns, LOSS_WEIGHT]  # type: ignore[has-type]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        weights = inputs.pop(LOSS_WEIGHT)

        def scale_rows(module: Any, args: Any, output: Any) -> None:
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                raise RuntimeError(f"zero_loss_pairs: {type(module).__name__} returned no last_hidden_state")
            if not hidden.requires_grad:
                return
            if hidden.shape[0] % len(weights):
                raise RuntimeError(f"zero_loss_pairs: {hidden.shape[0]} rows for {len(weights)} pairs")
            # one row per example (SFT, KTO), or the chosen rows then the rejected rows (pairwise)
            rows = weights.to(hidden.device, hidden.dtype).repeat(hidden.shape[0] // len(weights))
            hidden.register_hook(lambda grad: grad * rows.view(-1, *([1] * (grad.dim() - 1))))

        handle = _backbone(self.accelerator.unwrap_model(model)).register_forward_hook(scale_rows)  # type: ignore[attr-defined]
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        finally:
            handle.remove()


@contextlib.contextmanager
def completion_positions_only(enabled: bool = True) -> Any:
    """Make TRL's fused LM head project only the positions that carry a label, on every device.

    TRL 1.16's fused head (``trl.trainer.utils.add_fused_lm_head``) gathers the labelled positions
    only where its Triton kernel runs (CUDA/XPU); elsewhere it projects *every* position — prompt
    and padding included — through the 49k-word head, plus the entropy / mean-logit / top-1 metric
    fields, and masks them afterwards. It does so to keep tile shapes fixed for compiling backends
    (Neuron); eager CPU has nothing to recompile. In a DPO batch about half the positions are prompt
    or padding, and the head is about a fifth of SmolLM2's forward, so this matters on CPU
    (``bench/align.py`` measures it). The numbers are the same (``tests/test_align.py`` checks the
    losses and log-probs agree); only which rows enter the projection changes. Scoped, so nothing
    outside a stage's trainer sees it.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if not enabled or original is None:  # another TRL layout: leave it alone
        yield
        return
    trl_utils._use_triton = lambda device: True  # only decides "compact" there; the kernel choice is separate
    try:
        yield
    finally:
        trl_utils._use_triton = original


# --------------------------------------------------------------------------- TRL classes


def trl_classes(method: str) -> tuple[type, type]:
    """(config class, trainer class) of a method in TRL 1.16."""
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer
    if method in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer
    if method == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        return RLOOConfig, RLOOTrainer
    raise InputError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- datasets


def _prompt(pair: Any) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in pair.prompt]


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def kto_row_order(n_pairs: int, seed: int) -> list[tuple[int, bool]]:
    """(pair index, desirable) of each KTO row in the order the trainer sees them: every pair gives a
    desirable (chosen) and an undesirable (rejected) row, shuffled with ``seed``. Attribution rebuilds
    TRL's KL batches from it (``attribute.gradients.kto_kl``)."""
    order = [(i, desirable) for i in range(n_pairs) for desirable in (True, False)]
    random.Random(seed).shuffle(order)
    return order


def build_rows(method: str, pairs: Sequence[Any], seed: int,
               zero_loss: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows TRL's trainer for ``method`` expects, built from preference pairs.

    ``zero_loss`` (every method but rloo): pair ids whose rows get ``loss_weight`` 0, the others 1
    (see ``ZeroLossPairs``); under KTO both the desirable and the undesirable row of a pair.
    """
    zeroed = None if zero_loss is None else set(zero_loss)

    def weighted(row: dict[str, Any], pair: Any) -> dict[str, Any]:
        if zeroed is not None:
            row[LOSS_WEIGHT] = 0.0 if str(pair.id) in zeroed else 1.0
        return row

    if method in PAIRWISE:
        rows = []
        for p in pairs:
            row = {"prompt": _prompt(p), "chosen": _reply(p.chosen), "rejected": _reply(p.rejected)}
            if method in ("dpo", "ipo"):
                row["id"] = str(p.id)  # the reference cache's key
            rows.append(weighted(row, p))
        return rows
    if method == "sft":
        return [weighted({"prompt": _prompt(p), "completion": _reply(p.chosen)}, p) for p in pairs]
    if method == "kto":
        return [weighted({"prompt": _prompt(pairs[i]), "completion": _reply(pairs[i].chosen if desirable
                                                                             else pairs[i].rejected),
                          "label": desirable}, pairs[i]) for i, desirable in kto_row_order(len(pairs), seed)]
    if method == "rloo":
        seen: set[str] = set()
        rows = []
        flags = [p.meta.get("harmful_prompt") for p in pairs]
        with_flags = all(isinstance(f, bool) for f in flags)
        for p, flag in zip(pairs, flags, strict=True):
            key = repr(_prompt(p))
            if key in seen:
                continue
            seen.add(key)
            row: dict[str, Any] = {"prompt": _prompt(p)}
            if with_flags:
                row["harmful"] = flag
            rows.append(row)
        return rows
    raise InputError(f"unknown method {method!r}")


def build_dataset(method: str, pairs: Sequence[Any], seed: int, zero_loss: Sequence[str] | None = None) -> Any:
    from datasets import Dataset

    return Dataset.from_list(build_rows(method, pairs, seed, zero_loss))


# --------------------------------------------------------------------------- configs


def _explicit_trl_kwargs(stage: StageConfig, method: str) -> dict[str, Any]:
    """TRL config arguments that come from named StageConfig fields."""
    kw: dict[str, Any] = {
        "learning_rate": stage.resolved("learning_rate"),
        "num_train_epochs": stage.num_train_epochs,
        "max_steps": stage.max_steps,
        "per_device_train_batch_size": stage.per_device_train_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "lr_scheduler_type": stage.lr_scheduler_type,
        "warmup_steps": stage.warmup_steps,
        "weight_decay": stage.weight_decay,
        "max_grad_norm": stage.max_grad_norm,
        "optim": stage.optim,
        "gradient_checkpointing": stage.gradient_checkpointing,
        "seed": stage.seed,
        "data_seed": stage.seed if stage.data_seed is None else stage.data_seed,
        "logging_steps": stage.logging_steps,
        "save_strategy": "steps",
        "save_steps": stage.save_steps,
        "save_total_limit": stage.save_total_limit,
        "report_to": stage.report_to,
    }
    if method == "sft":
        kw.update(max_length=stage.max_length, truncation_mode=stage.truncation_mode)
    elif method in ("dpo", "ipo"):
        kw.update(max_length=stage.max_length, truncation_mode=stage.truncation_mode,
                  beta=stage.resolved("beta"), loss_type=stage.resolved("loss_type"),
                  loss_weights=stage.loss_weights, label_smoothing=stage.label_smoothing,
                  precompute_ref_log_probs=stage.precompute_ref_log_probs,
                  precompute_ref_batch_size=stage.precompute_ref_batch_size)
    elif method == "kto":
        kw.update(max_length=stage.max_length, beta=stage.resolved("beta"), loss_type=stage.resolved("loss_type"),
                  desirable_weight=stage.desirable_weight, undesirable_weight=stage.undesirable_weight)
    elif method == "orpo":
        kw.update(max_length=stage.max_length, max_completion_length=stage.max_completion_length,
                  beta=stage.resolved("beta"))
    elif method == "simpo":
        kw.update(max_length=stage.max_length, max_completion_length=stage.max_completion_length,
                  beta=stage.resolved("beta"), loss_type="simpo", cpo_alpha=0.0, simpo_gamma=stage.simpo_gamma,
                  label_smoothing=stage.label_smoothing)
    elif method == "rloo":
        kw.update(max_completion_length=stage.max_completion_length or 64, num_generations=stage.num_generations,
                  temperature=stage.temperature, beta=stage.resolved("beta"))
    return kw


def check_trl_passthrough(stage: StageConfig) -> None:
    """Reject ``trl:`` keys the method's TRL config lacks, or that a named stage field already sets."""
    config_cls, _ = trl_classes(stage.method)
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    explicit = set(_explicit_trl_kwargs(stage, stage.method)) | {"output_dir", "use_cpu", "bf16", "fp16",
                                                                  "activation_checkpointing"}
    for key in stage.trl:
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"trl.{key}: not an argument of {config_cls.__name__}{hint}")
        if key in explicit:
            raise InputError(f"trl.{key}: set it as the stage key {key!r} instead (it is a named stage setting)"
                             if key in StageConfig.model_fields else
                             f"trl.{key}: alignscope sets this itself")


def build_trl_args(stage: StageConfig, output_dir: str, *, use_cpu: bool, bf16: bool) -> Any:
    """The method's TRL config object for this stage."""
    check_trl_passthrough(stage)
    config_cls, _ = trl_classes(stage.method)
    kwargs = _explicit_trl_kwargs(stage, stage.method)
    kwargs.update(output_dir=output_dir, use_cpu=use_cpu, bf16=bf16, fp16=False)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(config_cls)}:
        # transformers ≥5.x renamed it; setting the new name too avoids its deprecation warning
        kwargs["activation_checkpointing"] = stage.gradient_checkpointing
    kwargs.update(stage.trl)
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InputError(f"stage {stage.label}: TRL rejected the settings: {exc}") from exc


def lora_config(stage: StageConfig) -> Any:
    from peft import LoraConfig

    s = stage.lora
    return LoraConfig(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=list(s.target_modules), bias=s.bias, use_rslora=s.use_rslora,
                      task_type="CAUSAL_LM")


def reward_function(name: str) -> Callable[..., list[float]] | str:
    """A reward from ``alignscope.data.synthesis.REWARDS``, or a reward-model directory / hub id."""
    from pathlib import Path

    from alignscope.data.synthesis import REWARDS

    if name in REWARDS:
        return REWARDS[name]
    if Path(name).is_dir() or (name.count("/") == 1 and not name.startswith((".", "/"))):
        return name  # TRL loads it as AutoModelForSequenceClassification
    raise InputError(f"unknown reward {name!r}; use one of {', '.join(sorted(REWARDS))}, "
                     "or a reward-model directory / hub id")


def build_trainer(stage: StageConfig, model: Any, tokenizer: Any, dataset: Any, args: Any, *,
                  callbacks: Sequence[Any] = (), reference_store: Any = None) -> Any:
    """The TRL trainer for ``stage.method``, with LoRA unless ``finetune: full``."""
    from alignscope.align.reference import make_cached_reference_trainer

    _, trainer_cls = trl_classes(stage.method)
    kwargs: dict[str, Any] = {"model": model, "args": args, "train_dataset": dataset,
                              "processing_class": tokenizer, "callbacks": list(callbacks)}
    if stage.finetune == "lora":
        kwargs["peft_config"] = lora_config(stage)
    if stage.method == "rloo":
        kwargs["reward_funcs"] = reward_function(stage.reward)
    if stage.method in ("dpo", "ipo") and stage.precompute_ref_log_probs and reference_store is not None:
        trainer_cls = make_cached_reference_trainer(trainer_cls)
        kwargs["reference_store"] = reference_store
    if stage.zero_loss_pairs is not None:
        trainer_cls = type(f"ZeroLoss{trainer_cls.__name__}", (ZeroLossPairs, trainer_cls), {})
    return _guarded(trainer_cls)(**kwargs)
