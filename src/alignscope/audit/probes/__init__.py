"""Probe modules. Importing this package registers every probe in ``alignscope.audit.base.PROBES``."""

import importlib

_MODULES = ("guise", "stereo_pairs", "agreement", "toxicity", "refusal", "ethics", "truthfulness", "privacy")

for _name in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a probe module not written yet
        if _exc.name != f"{__name__}.{_name}":
            raise
