"""SamplingParams: per-request generation settings with vLLM's names and meaning.

Validated at construction and again by `verify()`, which the engine calls when it accepts
a request: a bad value raises ValueError (or TypeError for a wrong type) naming the field
and the allowed range, so a bad request is refused before it reaches the engine. As in
vLLM, fields may be changed after construction (`params.max_tokens = 64`); the engine
works on its own verified copy, so changing a SamplingParams never affects a request
already queued.

`structured_outputs` (StructuredOutputsParams, vLLM's spelling; `guided_decoding` is the
older alias) constrains the output to a JSON schema, a regex, a choice or a grammar.
"""

from __future__ import annotations

import enum
import math
import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

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


def default_max_tokens(value):
    """`value` as a default max_tokens (e.g. a model's generation_config max_new_tokens): clamped
    to the room left in the context instead of refused. Non-integers are returned as given."""
    return _DefaultMaxTokens(value) if isinstance(value, int) and not isinstance(value, bool) else value


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries while it runs."""

    CUMULATIVE = 0  # all text / tokens so far (LLM.generate)
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # nothing until the request finishes


STRUCTURED_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
STRUCTURED_BACKENDS = (None, "auto", "xgrammar")


@dataclass
class StructuredOutputsParams:
    """One output constraint (exactly one of `STRUCTURED_CONSTRAINTS`), as vLLM spells it.

    json: a JSON schema (dict or JSON text); regex: a regular expression; choice: a list of
    strings the output must equal one of; grammar: EBNF (GBNF, `root ::= ...`) or Lark;
    json_object: any JSON object; structural_tag: xgrammar's structural tag (JSON text or
    dict). The options tune JSON output (whitespace between tokens, extra properties).
    """

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[Union[str, dict]] = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None
    backend: Optional[str] = None  # vLLM's guided_decoding_backend: only xgrammar here

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        given = [name for name in STRUCTURED_CONSTRAINTS
                 if getattr(self, name) is not None and getattr(self, name) is not False]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"structured outputs need exactly one constraint of {list(STRUCTURED_CONSTRAINTS)}; "
                             f"got {what}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = _json_loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(self.json, (dict, bool)):
                raise TypeError(f"structured_outputs.json must be a JSON schema (dict or JSON text), "
                                f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise TypeError(f"structured_outputs.choice must contain non-empty strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("structured_outputs.json_object must be true when given")
        if self.structural_tag is not None:
            if isinstance(self.structural_tag, str):
                try:
                    self.structural_tag = _json_loads(self.structural_tag)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
            if not isinstance(self.structural_tag, dict):
                raise TypeError("structured_outputs.structural_tag must be an object (dict or JSON text)")
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"structured_outputs.{name} must be a bool, got {getattr(self, name)!r}")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise TypeError("structured_outputs.whitespace_pattern must be a string")
        if self.backend not in STRUCTURED_BACKENDS:
            raise ValueError(f"structured output backend {self.backend!r} is not available; nanovllm uses xgrammar "
                             f"(leave the backend unset, or use 'auto' / 'xgrammar')")

    @property
    def kind(self) -> str:
        """Which constraint this is (one of STRUCTURED_CONSTRAINTS)."""
        return next(n for n in STRUCTURED_CONSTRAINTS if getattr(self, n) is not None and getattr(self, n) is not False)

    def cache_key(self) -> tuple:
        """A hashable key that identifies the compiled grammar (same key = same grammar)."""
        spec = getattr(self, self.kind)
        if isinstance(spec, (dict, list, bool)):
            spec = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return (self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties)


# vLLM's name for the same parameters before v0.11
GuidedDecodingParams = StructuredOutputsParams


def _json_loads(text: str) -> Any:
    return json.loads(text)


@dataclass
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
    structured_outputs: Optional[StructuredOutputsParams] = None
    guided_decoding: Optional[StructuredOutputsParams] = None  # vLLM's older name of structured_outputs

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Check (and normalise) every field; the engine calls this on its copy before use."""
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
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_token_ids("stop_token_ids", self.stop_token_ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0, high=MAX_LOGPROBS, hint=f"in [0, {MAX_LOGPROBS}]")
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError("output_kind must be a RequestOutputKind")
        self._verify_structured_outputs()

    def _verify_structured_outputs(self) -> None:
        so, gd = self.structured_outputs, self.guided_decoding
        if so is not None and gd is not None and so is not gd and so != gd:
            raise ValueError("give structured_outputs or guided_decoding (its older name), not both")
        so = so if so is not None else gd
        if so is None:
            return
        if isinstance(so, dict):
            so = StructuredOutputsParams(**so)
        if not isinstance(so, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}")
        so.verify()
        self.structured_outputs = self.guided_decoding = so

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

    @property
    def uses_structured_outputs(self) -> bool:
        return self.structured_outputs is not None

    def replace(self, **changes) -> "SamplingParams":
        """A verified copy with some fields changed (lists and dicts are copied, not shared)."""
        values = {f.name: _copy_value(getattr(self, f.name)) for f in fields(self)}
        values.update(changes)
        if "structured_outputs" in changes:
            values.pop("guided_decoding", None)
        elif "guided_decoding" in changes:
            values.pop("structured_outputs", None)
        return SamplingParams(**values)

    def clone(self) -> "SamplingParams":
        """A verified deep-enough copy (vLLM's name): later changes to either do not reach the other."""
        return self.replace()


def _copy_value(value):
    if isinstance(value, StructuredOutputsParams):
        return dataclasses.replace(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


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


def require_valid_unicode_in(name: str, value: Any) -> None:
    """require_valid_unicode on every string of a JSON-like value (nested lists and dicts, keys too)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            require_valid_unicode(name, item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


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
