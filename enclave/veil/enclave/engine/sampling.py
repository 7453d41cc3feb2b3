"""Per-request sampling parameters, validated when built."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from veil.enclave.engine.response_format import ResponseFormat
from veil.enclave.errors import InvalidRequestError

__all__ = ["MAX_SEED", "MAX_STOP_STRINGS", "MAX_STOP_STRING_CHARS", "SamplingParams"]

_T = TypeVar("_T")

MAX_SEED = 2**64 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1 switch those filters off. With a
    ``seed`` the same request gives the same tokens whatever else shares its batch; without
    one the engine draws a seed. ``stop`` strings end the completion where they first appear
    in the detokenized text (the stop string itself is not returned); ``stop_token_ids`` and,
    unless ``ignore_eos``, the model's end-of-sequence tokens end it too. ``min_tokens`` holds
    back every stop condition but ``max_tokens`` until that many tokens were generated.
    ``response_format`` constrains the completion to JSON, a JSON Schema or a grammar: tokens
    the grammar does not allow are masked before sampling, and EOS is allowed only where the
    grammar accepts (so it cannot be combined with ``ignore_eos`` or ``min_tokens``).
    Error messages name the field, never its text.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        # Accept any iterable for the two tuple fields (lists from JSON or protobuf).
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", _tuple_of(self.stop, str, "stop"))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", _tuple_of(self.stop_token_ids, int, "stop_token_ids"))
        _check_int(self.max_tokens, "max_tokens")
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1")
        _check_int(self.min_tokens, "min_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens must be in [0, max_tokens]")
        _check_float(self.temperature, "temperature")
        if self.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0")
        _check_float(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]")
        _check_int(self.top_k, "top_k")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0 (0 = off)")
        if self.seed is not None:
            _check_int(self.seed, "seed")
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidRequestError("seed must be in [0, 2**64)")
        for s in _tuple_of(self.stop, str, "stop"):
            if not s:
                raise InvalidRequestError("stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(f"stop strings are limited to {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings")
        for t in _tuple_of(self.stop_token_ids, int, "stop_token_ids"):
            _check_int(t, "stop_token_ids")
            if t < 0:
                raise InvalidRequestError("stop_token_ids must be non-negative")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos must be a bool")
        if self.response_format is not None:
            if not isinstance(self.response_format, ResponseFormat):
                raise InvalidRequestError("response_format must be a ResponseFormat")
            if self.ignore_eos or self.min_tokens:
                # EOS is the grammar's to allow: holding it back would push the output past the grammar.
                raise InvalidRequestError("response_format cannot be combined with ignore_eos or min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer")


def _check_float(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number")


def _tuple_of(values: object, kind: type[_T], name: str) -> tuple[_T, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidRequestError(f"{name} must be a list")
    out: list[_T] = []
    for v in values:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise InvalidRequestError(f"{name} has an element of the wrong type")
        out.append(v)
    return tuple(out)
