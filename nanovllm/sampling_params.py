"""SamplingParams: per-request generation settings with vLLM's names and meaning.

Frozen and validated at construction: a bad value raises ValueError (or
TypeError for a wrong type) naming the field and the allowed range, so a bad
request is refused before it reaches the engine.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Optional, Union

# vLLM caps returned alternatives at 20 (the OpenAI API's top_logprobs limit).
MAX_LOGPROBS = 20
# Temperatures below this are treated as greedy (avoids dividing by ~0).
GREEDY_TEMPERATURE_EPS = 1e-5
# Stop strings are searched in every step's new text of every completion, so their number
# and size are capped: one request must not slow the steps every other request shares.
MAX_STOP_STRINGS = 32
MAX_STOP_STRINGS_CHARS = 2048  # all stop strings of a request together
MAX_STOP_TOKEN_IDS = 1024  # checked per generated token


class _DefaultMaxTokens(int):
    """The default max_tokens: an int that remembers it was not chosen by the user.

    An explicit max_tokens that does not fit in the context is refused (as the server's
    400 does); the default is clamped to the room left. `replace()` keeps the marker.
    """

    def __repr__(self) -> str:
        return int.__repr__(self)


DEFAULT_MAX_TOKENS = _DefaultMaxTokens(16)


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries while it runs."""

    CUMULATIVE = 0  # all text / tokens so far (LLM.generate)
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # nothing until the request finishes


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS  # None = up to max_model_len
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # number of alternatives per generated token (0 = sampled only)
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        _check_float("temperature", self.temperature, low=0.0, hint=">= 0 (0 = greedy)")
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True, hint="in (0, 1]")
        _check_int("top_k", self.top_k, low=-1, hint="-1 or 0 (off) or a positive integer")
        _check_float("min_p", self.min_p, low=0.0, high=1.0, hint="in [0, 1]")
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0, hint="in [-2, 2]")
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0, hint="in [-2, 2]")
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True, hint="> 0 (1 = off)")
        if self.seed is not None:
            _check_int("seed", self.seed, low=None)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0, high=MAX_LOGPROBS, hint=f"in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError("output_kind must be a RequestOutputKind")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        """Build from a plain dict, refusing unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def effective_top_k(self) -> int:
        """top_k with 'off' spelled as 0."""
        return 0 if self.top_k in (0, -1) else self.top_k

    @property
    def max_tokens_is_default(self) -> bool:
        """True when max_tokens was left at its default (clamped to the context, never refused)."""
        return type(self.max_tokens) is _DefaultMaxTokens

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def replace(self, **changes) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name, value, low=0, high=None, hint=None) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = hint or (f">= {low}" if high is None else f"in [{low}, {high}]")
        raise ValueError(f"{name}={value} is out of range: must be {rng}")


def _check_float(name, value, low=None, high=None, low_open=False, hint=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    bad = math.isnan(value) or math.isinf(value)
    if low is not None and (value < low or (low_open and value == low)):
        bad = True
    if high is not None and value > high:
        bad = True
    if bad:
        raise ValueError(f"{name}={value} is out of range: must be {hint or f'in [{low}, {high}]'}")


def _normalize_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop must contain only strings, got {s!r}")
        if s == "":
            raise ValueError("stop strings must be non-empty")
        require_valid_unicode("stop", s)
    total = sum(len(s) for s in stop)
    if total > MAX_STOP_STRINGS_CHARS:
        raise ValueError(f"stop strings have {total} characters together; at most {MAX_STOP_STRINGS_CHARS} "
                         f"are allowed")
    return list(stop)


def require_valid_unicode(name: str, text: str) -> None:
    """Refuse lone UTF-16 surrogates (e.g. JSON's "\\ud800"): no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} contains an invalid character {text[e.start]!r} at position {e.start} (a lone "
                         f"UTF-16 surrogate): send valid Unicode text") from None


def _normalize_token_ids(name, ids) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"{name} has {len(ids)} token ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    for t in ids:
        if not _is_int(t) or t < 0:
            raise ValueError(f"{name} must contain non-negative integer token ids, got {t!r}")
    return list(ids)


def _normalize_logit_bias(bias) -> Optional[dict[int, float]]:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise TypeError(f"logit_bias keys must be token ids, got {k!r}") from None
        if tid < 0:
            raise ValueError(f"logit_bias token id {tid} must be >= 0")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise TypeError(f"logit_bias values must be numbers, got {v!r} for token {k}")
        if not -100 <= v <= 100:
            raise ValueError(f"logit_bias value {v} for token {k} must be in [-100, 100]")
        out[tid] = float(v)
    return out
