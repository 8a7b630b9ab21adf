"""Pluggable local text scorers: a probability-like score in [0, 1] per text, batched.

Why a registry: toxicity studies (RealToxicityPrompts, Gehman et al. 2020; DecodingTrust, Wang et
al. 2023) score generations with Google's Perspective API, which needs network access and an API
key, and changes over time. An offline audit needs a local classifier instead, and a user who has
a stronger one should be able to swap it in by name without touching a probe. Every scorer takes a
list of texts and returns one float per text, where higher means more toxic / more negative.

Registered scorers:

* ``profanity`` (default) -- ``alt-profanity-check``: a linear SVM on bag-of-words features,
  calibrated to a probability. Fast and offline, but lexical: it catches profanity, not subtle
  toxicity (insults without swear words, identity attacks, threats).
* ``hatesonar`` -- HateSonar's ONNX logistic-regression model (Davidson et al. 2017 tweets, most
  of them offensive); the score is 1 - P(neither), i.e. P(hate speech) + P(offensive language).
  Its base rate is high: plain neutral text scores about 0.3. Optional package
  (``pip install hatesonar`` brings onnxruntime and, through skl2onnx, onnx).
* ``vader`` -- VADER sentiment; the score is negativity ``max(0, -compound)`` (neutral and
  positive text score 0). Not a toxicity classifier: for code that wants a sentiment signal.
* ``detoxify`` and ``perspective`` -- registered only when their packages are importable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import numpy as np

from alignscope.errors import InputError

__all__ = ["SCORERS", "Scorer", "available_scorers", "get_scorer", "register_scorer", "score_texts"]

DEFAULT_SCORER = "profanity"


@dataclass(frozen=True)
class Scorer:
    """A named text scorer: ``score(texts)`` returns an array of floats in [0, 1]."""

    name: str
    description: str
    fn: Callable[[list[str]], np.ndarray]

    def score(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros(0, dtype=float)
        values = np.asarray(self.fn(texts), dtype=float).reshape(-1)
        if values.shape[0] != len(texts):
            raise RuntimeError(f"scorer {self.name}: returned {values.shape[0]} scores for {len(texts)} texts")
        if not np.all(np.isfinite(values)):
            raise RuntimeError(f"scorer {self.name}: returned a non-finite score")
        return np.clip(values, 0.0, 1.0)


#: name -> (description, factory). A factory builds the scoring function (loading models lazily).
SCORERS: dict[str, tuple[str, Callable[[], Callable[[list[str]], np.ndarray]]]] = {}
_BUILT: dict[str, Scorer] = {}


def register_scorer(name: str, description: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator for a factory that returns ``fn(texts) -> array``; built on first use, then reused."""

    def wrap(factory: Callable[[], Any]) -> Callable[[], Any]:
        SCORERS[name] = (description, factory)
        return factory

    return wrap


def available_scorers() -> list[str]:
    return sorted(SCORERS)


def get_scorer(name: str = DEFAULT_SCORER) -> Scorer:
    """The scorer registered as ``name`` (its model is loaded once per process)."""
    if name not in SCORERS:
        raise InputError(f"unknown text scorer {name!r}; use one of: {', '.join(available_scorers())}")
    if name not in _BUILT:
        description, factory = SCORERS[name]
        _BUILT[name] = Scorer(name=name, description=description, fn=factory())
    return _BUILT[name]


def score_texts(texts: Sequence[str], scorer: str = DEFAULT_SCORER) -> np.ndarray:
    """Convenience: ``get_scorer(scorer).score(texts)``."""
    return get_scorer(scorer).score(texts)


def _missing(package: str, pip_name: str) -> InputError:
    return InputError(f"text scorer needs the {package!r} package, which is not installed; "
                      f"install it with: pip install {pip_name}")


# --------------------------------------------------------------------------- profanity


@register_scorer("profanity", "alt-profanity-check: linear SVM on words, probability of profanity")
def _profanity() -> Callable[[list[str]], np.ndarray]:
    if find_spec("profanity_check") is None:
        raise _missing("profanity_check", "alt-profanity-check")
    from profanity_check import predict_prob

    return lambda texts: np.asarray(predict_prob(texts), dtype=float)


# --------------------------------------------------------------------------- vader


@register_scorer("vader", "VADER sentiment negativity: max(0, -compound)")
def _vader() -> Callable[[list[str]], np.ndarray]:
    if find_spec("vaderSentiment") is None:
        raise _missing("vaderSentiment", "vaderSentiment")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda texts: np.array([max(0.0, -analyzer.polarity_scores(t)["compound"]) for t in texts])


# --------------------------------------------------------------------------- hatesonar

_HATESONAR_CLASSES = {0: "hate_speech", 1: "offensive_language", 2: "neither"}


@register_scorer("hatesonar", "HateSonar ONNX model: P(hate speech) + P(offensive language)")
def _hatesonar() -> Callable[[list[str]], np.ndarray]:
    """Run HateSonar's ONNX graph directly, with its StringNormalizer locale set to ``C.utf8``.

    The shipped graph leaves the locale unset, so onnxruntime falls back to ``en_US.UTF-8``, which
    minimal systems (containers, CI) do not have; ``C.utf8`` is always present.
    """
    if find_spec("hatesonar") is None or find_spec("onnxruntime") is None or find_spec("onnx") is None:
        raise _missing("hatesonar (with onnxruntime and onnx)", "hatesonar")
    import onnx
    import onnxruntime as ort
    from hatesonar.api import DEFAULT_MODEL_FILE

    model = onnx.load(str(DEFAULT_MODEL_FILE))
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            kept = [a for a in node.attribute if a.name != "locale"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("locale", "C.utf8")])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def score(texts: list[str]) -> np.ndarray:
        _, probs = session.run(None, {input_name: np.array(texts, dtype=object)})
        return np.array([1.0 - float(_class_prob(p, 2)) for p in probs])

    return score


def _class_prob(probs: Any, index: int) -> float:
    """One class's probability from a ZipMap dict (int or name keys) or a plain row."""
    if isinstance(probs, dict):
        return float(probs[index] if index in probs else probs[_HATESONAR_CLASSES[index]])
    return float(np.asarray(probs)[index])


# --------------------------------------------------------------------------- optional adapters

if find_spec("detoxify") is not None:

    @register_scorer("detoxify", "Detoxify 'original' (BERT, Jigsaw): toxicity probability")
    def _detoxify() -> Callable[[list[str]], np.ndarray]:
        """Detoxify downloads its checkpoint on first use; point ``ALIGNSCOPE_DETOXIFY_CHECKPOINT``
        at a local copy to run offline."""
        from detoxify import Detoxify

        checkpoint = os.environ.get("ALIGNSCOPE_DETOXIFY_CHECKPOINT")
        try:
            model = Detoxify("original", checkpoint=checkpoint, device="cpu")
        except Exception as exc:  # network or checkpoint errors from torch.hub
            raise InputError(f"detoxify scorer: cannot load its checkpoint ({type(exc).__name__}: {exc}); "
                             "it downloads on first use, so offline set ALIGNSCOPE_DETOXIFY_CHECKPOINT "
                             "to a local checkpoint file") from None
        return lambda texts: np.asarray(model.predict(texts)["toxicity"], dtype=float)


if find_spec("googleapiclient") is not None:

    @register_scorer("perspective", "Google Perspective API TOXICITY (network; PERSPECTIVE_API_KEY)")
    def _perspective() -> Callable[[list[str]], np.ndarray]:
        """The scorer of RealToxicityPrompts and DecodingTrust; needs network and an API key."""
        key = os.environ.get("PERSPECTIVE_API_KEY")
        if not key:
            raise InputError("perspective scorer: set PERSPECTIVE_API_KEY to a Perspective API key "
                             "(it needs network access); offline, use --scorer profanity")
        from googleapiclient import discovery

        try:
            client = discovery.build(
                "commentanalyzer", "v1alpha1", developerKey=key, static_discovery=False,
                discoveryServiceUrl="https://commentanalyzer.googleapis.com/$discovery/rest?version=v1alpha1",
            )
        except Exception as exc:  # offline: DNS/connection errors from httplib2
            raise InputError(f"perspective scorer: cannot reach the Perspective API ({type(exc).__name__}); "
                             "it needs network access; offline, use --scorer profanity") from None

        def score(texts: list[str]) -> np.ndarray:
            out = []
            for text in texts:
                body = {"comment": {"text": text or " "}, "requestedAttributes": {"TOXICITY": {}},
                        "languages": ["en"], "doNotStore": True}
                try:
                    reply = client.comments().analyze(body=body).execute()
                except Exception as exc:
                    raise InputError(f"perspective scorer: request failed ({type(exc).__name__}: {exc}); "
                                     "check the key, quota and network, or use --scorer profanity") from None
                out.append(reply["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
            return np.asarray(out, dtype=float)

        return score
