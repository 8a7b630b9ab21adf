"""The obviously-correct slow path: one request, one full forward pass, full log-softmax.

It exists to validate the engine (tests) and as the "one request at a time" baseline in
``bench/score.py``. Probes must never call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignscope.models.hf_backend import HFBackend
from alignscope.models.loading import LoadedModel
from alignscope.models.requests import ScoreRequest


def reference_logprobs(lm: LoadedModel, requests: Sequence[ScoreRequest]) -> list[list[float]]:
    """Per-token continuation log-probs, computed independently for each request."""
    tokenize = HFBackend(lm)  # reuse only its tokenisation rule, which tests check separately
    out = []
    with torch.inference_mode():
        for i, req in enumerate(requests):
            enc = tokenize.encode_score(i, req)
            ids = list(enc.prefix) + enc.continuation
            logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0].float()
            logp = logits.log_softmax(-1)
            start = len(enc.prefix)
            out.append([logp[t - 1, ids[t]].item() for t in range(start, len(ids))])
    return out
