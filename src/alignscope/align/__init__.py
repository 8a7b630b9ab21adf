"""Training stages on TRL + PEFT: SFT, DPO (any TRL loss type), IPO, ORPO, KTO, SimPO and RLOO,
LoRA by default, multi-stage recipes (stage k merged into stage k+1's start) and a persistent
reference log-prob cache. See ``stage.py`` for the run-directory layout."""

from alignscope.align.config import METHODS, LoraSettings, RecipeConfig, StageConfig, load_stage_config, parse_stages
from alignscope.align.reference import ReferenceStore, read_reference, stage_reference
from alignscope.align.stage import (
    StageFailed,
    StageResult,
    align_command,
    merge_adapter,
    merged_checkpoint,
    train_recipe,
    train_stage,
)

__all__ = [
    "METHODS",
    "LoraSettings",
    "RecipeConfig",
    "ReferenceStore",
    "StageConfig",
    "StageFailed",
    "StageResult",
    "align_command",
    "load_stage_config",
    "merge_adapter",
    "merged_checkpoint",
    "parse_stages",
    "read_reference",
    "stage_reference",
    "train_recipe",
    "train_stage",
]
