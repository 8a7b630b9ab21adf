"""Probe modules. Importing this package registers every probe in ``alignscope.audit.base.PROBES``."""

from alignscope.audit.probes import (  # noqa: F401
    agreement,
    ethics,
    guise,
    planted,
    privacy,
    refusal,
    stereo_pairs,
    toxicity,
    truthfulness,
)
