"""Attribution: which preference pairs of a stage moved an audit metric (see ``core.py``)."""

from alignscope.attribute.core import (
    ATTRIBUTION_STAGE,
    METHODS,
    Curation,
    attribute,
    curate,
    expand_methods,
    resolve_stage,
    stage_pairs,
)
from alignscope.attribute.estimators import SIGN_CONVENTION, planted_auc, recall_at_k
from alignscope.attribute.objective import Objective, objective_from_summary

__all__ = [
    "ATTRIBUTION_STAGE",
    "METHODS",
    "SIGN_CONVENTION",
    "Curation",
    "Objective",
    "attribute",
    "curate",
    "expand_methods",
    "objective_from_summary",
    "planted_auc",
    "recall_at_k",
    "resolve_stage",
    "stage_pairs",
]
