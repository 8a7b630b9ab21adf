"""One command from a base model to an HTML report (see :mod:`alignscope.study.pipeline`)."""

from alignscope.study.config import StudyConfig, load_study_config, quick
from alignscope.study.pipeline import run_study

__all__ = ["StudyConfig", "load_study_config", "quick", "run_study"]
