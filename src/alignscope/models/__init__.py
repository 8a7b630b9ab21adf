"""Models: loading (built-ins, local directories, hub ids, adapters) and the scoring engine."""

from alignscope.models.builtin import BUILTINS, DEFAULT_MODEL
from alignscope.models.engine import Engine, ResultCache
from alignscope.models.loading import LoadedModel, load
from alignscope.models.requests import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult

__all__ = [
    "BUILTINS", "DEFAULT_MODEL", "Engine", "GenerateRequest", "GenerateResult", "LoadedModel",
    "ResultCache", "ScoreRequest", "ScoreResult", "load",
]
