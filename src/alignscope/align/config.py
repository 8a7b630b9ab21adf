"""Stage configuration: one pydantic model per training stage, YAML in, unknown keys rejected by name.

Field names mirror TRL's ``XConfig`` / transformers' ``TrainingArguments`` wherever one exists
(``learning_rate``, ``per_device_train_batch_size``, ``max_length``, ``beta``, ``loss_type`` …), so
a TRL user can read a stage file without a glossary. What TRL has but this model does not name
explicitly goes under ``trl:`` and is passed verbatim to the method's TRL config class (its keys
are checked against that class, so a typo is still an error naming the key).

A file holds either one stage (a mapping with the fields below) or a multi-stage recipe::

    stages:
      - method: sft
        learning_rate: 2.0e-4
      - method: dpo
        beta: 0.1

Stage ``k+1`` starts from stage ``k``'s result **merged** into plain weights (see
``alignscope.align.stage``), so "SFT then DPO" means DPO's policy *and* reference are the SFT model.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignscope.errors import InputError

Method = Literal["sft", "dpo", "ipo", "orpo", "kto", "simpo", "rloo"]
METHODS: tuple[str, ...] = ("sft", "dpo", "ipo", "orpo", "kto", "simpo", "rloo")

# TRL 1.16 DPO loss types (DPOConfig.loss_type); several may be combined with ``loss_weights``.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
#: DPO losses whose TRL 1.16 formula reads label_smoothing (``DPOTrainer._compute_loss``); sigmoid does not.
SMOOTHED_DPO_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")

# Defaults that depend on the method (used when the field is left unset). Learning rates are for
# LoRA; full fine-tuning divides them by 10. SimPO's beta/gamma follow the SimPO paper's small-model
# settings (β=2, γ/β=0.25 → γ=0.5); the others follow TRL.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 2e-4},
    "dpo": {"learning_rate": 5e-5, "beta": 0.1, "loss_type": ["sigmoid"]},
    "ipo": {"learning_rate": 5e-5, "beta": 0.1, "loss_type": ["ipo"]},
    "orpo": {"learning_rate": 5e-5, "beta": 0.1},
    "kto": {"learning_rate": 5e-5, "beta": 0.1, "loss_type": "kto"},
    "simpo": {"learning_rate": 5e-5, "beta": 2.0, "loss_type": "simpo"},
    "rloo": {"learning_rate": 1e-5, "beta": 0.05},
}

# Fields that only some methods read (left out of other methods' cache keys).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "reward": ("rloo",), "num_generations": ("rloo",), "temperature": ("rloo",),
    "simpo_gamma": ("simpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
    "precompute_ref_log_probs": ("dpo", "ipo"), "precompute_ref_batch_size": ("dpo", "ipo"),
    "loss_weights": ("dpo", "ipo"), "label_smoothing": ("dpo", "ipo", "simpo"),
    "max_completion_length": ("orpo", "simpo", "rloo"), "truncation_mode": ("sft", "dpo", "ipo"),
    "beta": ("dpo", "ipo", "orpo", "kto", "simpo", "rloo"), "loss_type": ("dpo", "ipo", "kto", "simpo"),
}

# Keys that change how a run is logged or checkpointed but not the trained weights: they are left
# out of the cache key, so changing them does not retrain.
NON_RESULT_KEYS = frozenset({"report_to", "logging_steps", "save_steps", "save_total_limit", "name"})


class LoraSettings(BaseModel):
    """LoRA adapter settings (PEFT ``LoraConfig`` names)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description="Module names (suffixes) that get an adapter.")
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False


# Methods whose pairs ``zero_loss_pairs`` can zero exactly (see ``check_zero_loss``).
ZERO_LOSS_METHODS: tuple[str, ...] = ("sft", "dpo", "ipo", "orpo", "simpo", "kto")


def check_zero_loss(stage: StageConfig) -> None:
    """Refuse the stages where zeroing a pair's gradient is not exact.

    Zeroing scales, row by row, the gradient that reaches the transformer's last hidden state
    (``alignscope.align.recipes.ZeroLossPairs``). That is exact for every weight below it (all LoRA
    adapters on the blocks) when each loss term depends only on its own pair's rows, as in TRL 1.16's
    SFT, DPO/IPO, ORPO, SimPO (CPO) and KTO losses (KTO's KL baseline is computed without gradient).
    It is not exact for the output head, for rows that hold several examples (packing, padding_free),
    for losses that sort pairs against each other (aot), or for RLOO, whose rows are deduplicated
    prompts with sampled completions rather than the pairs.
    """
    if stage.method not in ZERO_LOSS_METHODS:
        raise ValueError(f"zero_loss_pairs: supported for {', '.join(ZERO_LOSS_METHODS)} stages, not "
                         f"{stage.method} (it trains on completions it samples for deduplicated prompts, so a "
                         "pair has no rows of its own)")
    if stage.finetune != "lora" or "lm_head" in stage.lora.target_modules:
        raise ValueError("zero_loss_pairs: needs finetune: lora without an adapter on lm_head (the output "
                         "head's gradient is not scaled per pair)")
    packed = [key for key in ("padding_free", "packing") if stage.trl.get(key)]
    if packed:
        raise ValueError(f"zero_loss_pairs: trl.{packed[0]} puts several examples in one row, so pairs cannot "
                         f"be told apart; leave trl.{packed[0]} unset")
    mixing = sorted(set(stage.resolved("loss_type") or []) & {"aot", "aot_unpaired"})
    if mixing:
        raise ValueError(f"zero_loss_pairs: loss_type {mixing[0]} sorts scores across the batch, so a pair's "
                         "gradient cannot be removed on its own; use another loss type")


class StageConfig(BaseModel):
    """One training stage. Every field has a documented default; ``None`` means "method default"."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Method = Field("dpo", description="sft, dpo, ipo, orpo, kto, simpo or rloo.")
    name: str | None = Field(None, description="Label shown in logs and summaries (not part of the cache key).")
    data: str | None = Field(None, description="Preference data for this stage; defaults to the command's --data.")

    # what is trained
    finetune: Literal["lora", "full"] = Field("lora", description="LoRA adapter (default) or all weights.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weight dtype. auto: LoRA on bf16 weights where the hardware has bf16 (adapter "
        "weights stay fp32); full fine-tuning keeps fp32 master weights.")
    bf16: bool | None = Field(None, description="bf16 autocast (mixed precision); None: on for full fine-tuning "
                              "on bf16 hardware, off when the weights are already bf16.")

    # optimisation (TrainingArguments names)
    learning_rate: float | None = Field(None, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Positive: stop after this many optimizer steps (overrides epochs).")
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: str = "linear"
    warmup_steps: float = Field(0.0, ge=0, description="Steps, or a fraction of all steps when < 1.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (TRL defaults to True; "
                                         "off here because small models on CPU are compute-bound).")
    seed: int = 0
    data_seed: int | None = Field(None, description="Seed of the data order alone (None: seed). The adapter's "
                                  "initialisation keeps seed, so a retrain with another data_seed shows how much "
                                  "the order by itself moves a result.")

    # tokenisation
    max_length: int | None = Field(512, ge=8, description="Prompt + completion tokens; longer examples are "
                                   "truncated (and counted in the stage summary).")
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    max_completion_length: int | None = Field(None, ge=1, description="ORPO/SimPO: completion budget; "
                                              "RLOO: generated tokens (default 64).")

    # preference objectives
    beta: float | None = Field(None, gt=0)
    loss_type: str | list[str] | None = Field(None, description="DPO: any TRL DPO loss type (or a list combined "
                                              "with loss_weights); KTO: kto or apo_zero_unpaired.")
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable (chosen) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable (rejected) examples.")
    precompute_ref_log_probs: bool = Field(True, description="DPO/IPO: read the reference log-probs from the "
                                           "run's reference cache instead of recomputing them every step.")
    precompute_ref_batch_size: int = Field(8, ge=1)
    zero_loss_pairs: list[str] | None = Field(
        None, description="SFT, DPO/IPO, ORPO, SimPO or KTO with LoRA: ids of pairs that stay in the data, its "
        "order and its batches, but whose loss is multiplied by 0, so they add no gradient (means keep their "
        "normaliser: SFT still divides by every labelled token of the batch). This is the leave-k-out objective "
        "with nothing else changed (curation's zero-loss retrain); the logged loss still includes them.")

    # RLOO
    reward: str = Field("helpful_harmless", description="RLOO reward: a name from alignscope.data.synthesis."
                        "REWARDS (helpful_harmless, toxicity, sentiment, length, refusal) or a reward-model "
                        "directory / hub id.")
    num_generations: int = Field(2, ge=2)
    temperature: float = Field(1.0, gt=0)

    # bookkeeping
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(25, ge=1, description="Checkpoint interval; an interrupted stage resumes from the last one.")
    save_total_limit: int | None = Field(2, ge=1)
    tracin_snapshots: int = Field(0, ge=0, description="LoRA: keep this many adapter snapshots, evenly spaced "
                                  "over training (the first one before step 1), for TracIn attribution "
                                  "(`attribute --method tracin`); 0 keeps none.")
    report_to: str | list[str] = Field("none", description="Passed to TRL (e.g. tensorboard, wandb).")

    trl: dict[str, Any] = Field(default_factory=dict, description="Further keyword arguments for the method's "
                                "TRL config class, passed verbatim.")

    @field_validator("loss_type")
    @classmethod
    def _loss_type_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    @model_validator(mode="after")
    def _check_method_fields(self) -> StageConfig:
        if self.tracin_snapshots and self.finetune == "full":
            raise ValueError("tracin_snapshots: snapshots are LoRA adapters; with finetune: full use "
                             "--method gradsim or datainf (set tracin_snapshots: 0)")
        if self.zero_loss_pairs is not None:
            check_zero_loss(self)
        losses = [self.loss_type] if isinstance(self.loss_type, str) else (self.loss_type or [])
        if self.method in ("dpo", "ipo"):
            bad = [x for x in losses if x not in DPO_LOSS_TYPES]
            if bad:
                raise ValueError(f"loss_type {bad[0]!r} is not a TRL DPO loss; choose from {', '.join(DPO_LOSS_TYPES)}")
            if self.method == "ipo" and losses and losses != ["ipo"]:
                raise ValueError("method ipo fixes loss_type to 'ipo'; use method dpo to pick another loss")
            smoothed = [x for x in losses if x in SMOOTHED_DPO_LOSSES]
            if self.label_smoothing and not smoothed:
                named = ", ".join(losses) or ("ipo" if self.method == "ipo" else "sigmoid") + " (the default)"
                raise ValueError(f"label_smoothing {self.label_smoothing}: TRL's DPO trainer ignores it for loss_type "
                                 f"{named}; it applies to {', '.join(SMOOTHED_DPO_LOSSES)} only (remove it, or pick "
                                 "one of those)")
        elif self.method == "kto":
            if len(losses) > 1 or (losses and losses[0] not in KTO_LOSS_TYPES):
                raise ValueError(f"KTO loss_type must be one of {', '.join(KTO_LOSS_TYPES)}")
            if self.per_device_train_batch_size < 2:
                raise ValueError("KTO needs per_device_train_batch_size >= 2 (its KL term pairs examples in a batch)")
        elif self.method == "simpo":
            if losses and losses != ["simpo"]:
                raise ValueError("method simpo fixes loss_type to 'simpo'")
        elif losses:
            raise ValueError(f"loss_type does not apply to method {self.method}")
        if self.method == "rloo":
            effective = self.per_device_train_batch_size * self.gradient_accumulation_steps
            if effective % self.num_generations:
                raise ValueError(f"RLOO: per_device_train_batch_size × gradient_accumulation_steps ({effective}) "
                                 f"must be divisible by num_generations ({self.num_generations})")
        return self

    # -- resolved values -------------------------------------------------------------------------
    def resolved(self, key: str) -> Any:
        """A field's value with the method default filled in."""
        value = getattr(self, key)
        if value is None:
            value = METHOD_DEFAULTS[self.method].get(key)
            if key == "learning_rate" and self.finetune == "full":
                value = value / 10
        if key == "loss_type" and self.method in ("dpo", "ipo") and isinstance(value, str):
            value = [value]
        return value

    def result_dict(self) -> dict[str, Any]:
        """Everything that can change the trained weights, with defaults resolved (the cache key part).

        Fields that the stage's method ignores are left out, so e.g. changing ``reward`` does not
        retrain a DPO stage.
        """
        out = self.model_dump(mode="json", exclude=set(NON_RESULT_KEYS))
        for key in ("learning_rate", "beta", "loss_type"):
            out[key] = self.resolved(key)
        out.pop("data", None)  # the data enters the key through its content fingerprint
        for key, methods in METHOD_FIELDS.items():
            if self.method not in methods:
                out.pop(key, None)
        if self.finetune == "full":
            out.pop("lora", None)
        if not self.tracin_snapshots:
            out.pop("tracin_snapshots")  # keeps the keys of stages from before the option existed
        if self.data_seed is None:
            out.pop("data_seed")  # likewise
        if self.zero_loss_pairs is None:
            out.pop("zero_loss_pairs")  # likewise
        else:
            out["zero_loss_pairs"] = sorted(set(self.zero_loss_pairs))
        return out

    @property
    def label(self) -> str:
        return self.name or self.method

    def with_zero_loss(self, ids: Sequence[str]) -> StageConfig:
        """This stage with ``ids`` in ``zero_loss_pairs`` (sorted), validated: what a zero-loss curation
        retrains (the study's, and ``curate --zero-loss``'s YAML); raises ValueError where it is not exact."""
        return StageConfig.model_validate({**self.model_dump(), "zero_loss_pairs": sorted(ids)})


class RecipeConfig(BaseModel):
    """A multi-stage recipe: ``stages`` run in order, each starting from the previous one merged."""

    model_config = ConfigDict(extra="forbid")

    stages: list[StageConfig] = Field(min_length=1)


def parse_stages(raw: Any, source: str = "config") -> list[StageConfig]:
    """Validate a mapping (one stage, or ``{"stages": [...]}``) into stage configs.

    Errors become one ``InputError`` naming the file, the offending key and, for a misspelt key,
    the closest valid name.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of stage settings (or 'stages: [...]'), "
                         f"got {type(raw).__name__}")
    try:
        if "stages" in raw:
            return RecipeConfig.model_validate(raw).stages
        return [StageConfig.model_validate(raw)]
    except ValidationError as exc:
        raise InputError(f"{source}: {_explain(exc, recipe='stages' in raw)}") from None


def load_stage_config(path: str | Path) -> list[StageConfig]:
    """Read a stage/recipe YAML file (``yaml.safe_load``) into validated stage configs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"config {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_stages(raw, source=str(path))


# Common names from other tools, for the did-you-mean hint.
ALIASES = {
    "rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
    "target": "target_modules", "lr": "learning_rate", "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size", "train_batch_size": "per_device_train_batch_size",
    "steps": "max_steps", "grad_accum": "gradient_accumulation_steps", "max_seq_length": "max_length",
    "max_prompt_length": "max_length", "warmup_ratio": "warmup_steps", "full_finetune": "finetune",
}


def _explain(exc: ValidationError, recipe: bool = False) -> str:
    """First validation error as 'where: what' with a did-you-mean for unknown keys."""
    err = exc.errors()[0]
    loc = [str(x) for x in err["loc"]]
    where = ".".join(loc) if loc else "(top level)"
    if err["type"] == "extra_forbidden" and recipe and len(loc) == 1:
        return (f"unknown key {loc[0]!r} next to 'stages'; a recipe file holds only 'stages: [...]' "
                "(put settings inside each stage)")
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        model: type[BaseModel] = LoraSettings if "lora" in loc[:-1] else StageConfig
        close = [ALIASES[key]] if ALIASES.get(key) in model.model_fields else \
            difflib.get_close_matches(key, list(model.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parent = ".".join(loc[:-1])
        scope = f" in {parent}" if parent else ""
        return (f"unknown key {key!r}{scope}{hint}; valid keys: {', '.join(model.model_fields)}"
                + ("" if model is LoraSettings else "; other TRL arguments go under 'trl:'"))
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if loc else msg
