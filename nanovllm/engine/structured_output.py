"""Structured output, the engine's half: grammars compiled with xgrammar, one matcher per
request, and each step's token bitmasks (host arrays; no torch).

    GrammarCompiler          StructuredOutputsParams -> xgrammar CompiledGrammar, LRU-cached
                             per normalised spec (same schema text = one compilation)
    StructuredOutputManager  owned by the engine: compiles when a request is added (a bad
                             spec is a ValueError then), keeps one GrammarMatcher per request,
                             advances it with the request's accepted tokens and fills the
                             step's bitmask rows ([R, ceil(V / 32)] int32, bit j of word w =
                             token 32 w + j allowed), which travel to the worker in StepInput

The worker's half (worker/grammar_mask.py) masks the logits with those rows. The engine
owns the matchers because it owns the tokenizer, validation and request lifetimes: one
compilation per grammar, refused before admission, released when the request finishes or
is aborted. All grammar state lives in a StructuredOutputManager object: two engines in one
process never share matchers or caches. xgrammar is imported on first use, so engines that
never see a structured request never load it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from nanovllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger("nanovllm")

BITS_PER_WORD = 32
# from this many grammar rows in one step, xgrammar fills their bitmasks on several threads
BATCH_FILL_MIN_ROWS = 8
DEFAULT_GRAMMAR_CACHE_ENTRIES = 256
# xgrammar compiles with this many threads (its default is 8, far more than a small host has)
COMPILER_THREADS = 2
XGRAMMAR_HINT = "pip install xgrammar"


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # an optional-looking dependency that is in fact required for this feature
        raise ValueError(f"structured outputs need the xgrammar package, which is not installed ({e}); "
                         f"run `{XGRAMMAR_HINT}`") from None
    return xgrammar


# ----------------------------------------------------------------------------- compile + cache


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; an LRU cache keyed by the spec.

    Bad specs (schemas xgrammar cannot handle, regexes or grammars that do not parse) raise
    ValueError with xgrammar's reason, so the request is refused before it runs. Thread-safe:
    servers compile on their preprocessing threads while the engine thread reads the cache.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 max_entries: int = DEFAULT_GRAMMAR_CACHE_ENTRIES) -> None:
        if tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this engine runs with skip_tokenizer_init=True")
        xgr = _import_xgrammar()
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        # xgrammar's own cache keys by the exact text; ours by the normalised spec (and bounded)
        self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS, cache_enabled=False)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()  # guards the cache; compilations themselves run unlocked
        self.max_entries = max_entries
        self.num_compilations = 0  # cache misses (tests and logs read it)

    def compile(self, spec: StructuredOutputsParams):
        key = spec.cache_key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile_uncached(spec)  # xgrammar's compiler is thread-safe and releases the GIL
        with self._lock:
            self.num_compilations += 1
            self._cache[key] = compiled
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return compiled

    def _compile_uncached(self, spec: StructuredOutputsParams):
        kind = spec.kind
        c = self._compiler
        try:
            if kind == "json":
                schema = spec.json
                if spec.disable_additional_properties:
                    schema = no_additional_properties(schema)
                return c.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace)
            if kind == "json_object":
                return c.compile_json_schema({"type": "object"}, any_whitespace=not spec.disable_any_whitespace)
            if kind == "regex":
                return c.compile_regex(spec.regex)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(spec.choice))
            if kind == "grammar":
                if "::=" in spec.grammar:  # EBNF / GBNF
                    return c.compile_grammar(spec.grammar)
                return c.compile_lark(spec.grammar)
            if kind == "structural_tag":
                return self._compile_structural_tag(spec.structural_tag)
        except Exception as e:  # xgrammar raises its own types (InvalidJSONError, RuntimeError, ...)
            raise ValueError(f"structured_outputs.{kind} could not be compiled: {_first_line(e)}") from None
        raise ValueError(f"unknown structured output kind {kind!r}")

    def _compile_structural_tag(self, tag: dict):
        """xgrammar's structural tag {"type": "structural_tag", "format": ...}, or the older shape
        vLLM's examples send: {"type": "structural_tag", "structures": [...], "triggers": [...]}."""
        if "format" in tag:
            return self._compiler.compile_structural_tag(tag)
        structures = tag.get("structures")
        triggers = tag.get("triggers")
        if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
            raise ValueError("a structural tag needs non-empty lists `structures` ({begin, schema, end}) and "
                             "`triggers`")
        items = []
        for s in structures:
            if not isinstance(s, dict) or not {"begin", "end"} <= set(s):
                raise ValueError("each structural tag structure needs `begin`, `schema` and `end`")
            items.append(self._xgr.StructuralTagItem(begin=s["begin"], schema=s.get("schema", {}), end=s["end"]))
        return self._compiler.compile_structural_tag(items, triggers)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly the given strings (JSON string escapes are EBNF's too)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def no_additional_properties(schema):
    """A copy of a JSON schema where every object schema without `additionalProperties` forbids them."""
    if isinstance(schema, dict):
        out = {k: no_additional_properties(v) for k, v in schema.items()}
        if out.get("type") == "object" or "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [no_additional_properties(v) for v in schema]
    return schema


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


# ----------------------------------------------------------------------------- per-request matchers


@dataclass
class _Matcher:
    matcher: object  # xgrammar GrammarMatcher
    num_accepted: int = 0  # output tokens fed to the matcher so far
    broken: bool = False  # a token was refused (e.g. forced by min_tokens): no more masking


class StructuredOutputManager:
    """The engine's grammar state: a compiler (created on first use) and a matcher per request.

    `fill_bitmask` is called when a step is built, for the rows that sample in it; the
    matcher must see every earlier output token first, so under async scheduling the engine
    resolves the step in flight before scheduling a structured request again (as it does
    for penalties).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: Optional[GrammarCompiler] = None
        self._compiler_lock = threading.Lock()  # the compiler is made once, by whichever thread needs it first
        self._matchers: dict[str, _Matcher] = {}
        self._batch_filler = None  # xgrammar BatchGrammarMatcher, made when a step has many grammar rows

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            with self._compiler_lock:
                if self._compiler is None:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._compiler

    @property
    def num_live_matchers(self) -> int:
        return len(self._matchers)

    def validate(self, spec: StructuredOutputsParams) -> None:
        """Compile (cached) now, so that a bad spec is refused when the request is added."""
        self.compiler.compile(spec)

    def fill_bitmask(self, request_ids: Sequence[str], specs: Sequence[Optional[StructuredOutputsParams]],
                     output_token_ids: Sequence[Sequence[int]]) -> Optional[tuple[np.ndarray, list[int]]]:
        """Bitmasks of one step's grammar rows: (int32 [R, W], their row indices in the batch), or None.

        Only rows whose grammar is live get a bitmask row (finished or broken grammars do
        not), so the host work and the copy to the device grow with R, not with the batch.
        Each matcher first accepts the request's output tokens it has not seen yet.
        """
        rows = [i for i, s in enumerate(specs) if s is not None]
        if not rows:
            return None
        live: list[tuple[int, object]] = []
        for i in rows:
            state = self._matcher(request_ids[i], specs[i])
            self._advance(request_ids[i], state, output_token_ids[i])
            if not (state.broken or state.matcher.is_terminated()):
                live.append((i, state.matcher))
        if not live:
            return None
        bitmask = np.empty((len(live), bitmask_width(self.vocab_size)), dtype=np.int32)  # [R, W]
        if len(live) >= BATCH_FILL_MIN_ROWS:  # xgrammar fills them on several threads
            if self._batch_filler is None:
                self._batch_filler = self.compiler._xgr.BatchGrammarMatcher()
            self._batch_filler.batch_fill_next_token_bitmask([m for _, m in live], bitmask)
        else:
            for k, (_, matcher) in enumerate(live):
                matcher.fill_next_token_bitmask(bitmask, k)
        return bitmask, [i for i, _ in live]

    def release(self, request_ids) -> None:
        """Drop the matchers of finished or aborted requests (unknown ids are ignored)."""
        for rid in request_ids:
            self._matchers.pop(rid, None)

    def _matcher(self, request_id: str, spec: StructuredOutputsParams) -> _Matcher:
        state = self._matchers.get(request_id)
        if state is None:
            compiled = self.compiler.compile(spec)
            state = self._matchers[request_id] = _Matcher(self.compiler._xgr.GrammarMatcher(compiled))
        return state

    def _advance(self, request_id: str, state: _Matcher, tokens: Sequence[int]) -> None:
        if state.broken:
            return
        for token in tokens[state.num_accepted:]:
            if state.matcher.is_terminated():
                break
            if not state.matcher.accept_token(int(token)):
                logger.warning("request %s: token %d does not fit its grammar (forced by min_tokens or a "
                               "stop condition?); the rest of its output is not constrained", request_id, token)
                state.broken = True
                return
        state.num_accepted = len(tokens)
