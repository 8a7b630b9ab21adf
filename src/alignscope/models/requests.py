"""The two request kinds every probe uses (as in lm-evaluation-harness): score and generate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from alignscope.errors import InputError


@dataclass(frozen=True)
class ScoreRequest:
    """Log-probability of ``continuation`` given ``context``.

    ``chat=True`` wraps the context as a user turn (plus optional ``system`` turn) in the model's
    chat template, so the continuation is scored as the assistant's reply.
    """

    context: str
    continuation: str
    chat: bool = False
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.context, str) or not isinstance(self.continuation, str):
            raise InputError("score request: context and continuation must be strings")
        if not self.continuation:
            raise InputError("score request: empty continuation; there is nothing to score")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScoreResult:
    """Sum of continuation token log-probs, the per-token values, and whether greedy decoding
    would have produced exactly this continuation (lm-eval's ``is_greedy``)."""

    logprob: float
    token_logprobs: list[float]
    token_ids: list[int]
    is_greedy: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreResult:
        return cls(**data)


@dataclass(frozen=True)
class GenerateRequest:
    """A continuation of ``context``: greedy when ``temperature == 0``, else sampled.

    ``num_samples`` draws k samples; ``stop`` truncates each output at the first stop string.
    """

    context: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0
    chat: bool = False
    system: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("generate request: max_new_tokens must be at least 1")
        if self.num_samples < 1:
            raise InputError("generate request: num_samples must be at least 1")
        if self.temperature < 0:
            raise InputError("generate request: temperature must be >= 0 (0 means greedy)")
        if self.temperature == 0 and self.num_samples > 1:
            raise InputError("generate request: k > 1 samples need temperature > 0 (greedy is deterministic)")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def sampling_key(self) -> tuple[Any, ...]:
        """Requests with the same key can share one ``generate`` call."""
        return (self.max_new_tokens, self.temperature, self.top_p, self.num_samples, self.stop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateResult:
    texts: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateResult:
        return cls(**data)
