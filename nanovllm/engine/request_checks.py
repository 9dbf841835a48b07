"""The checks a request passes before it is queued, in one place.

LLMEngine.add_request runs them; so does the engine-process client (engine_process.py) in
the server's process, so that a bad request is refused there with the same
ValueError/TypeError (and `.param`) before anything crosses the pipe to the engine process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nanovllm.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType, invalid
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class CheckedRequest:
    prompt: ProcessedPrompt
    params: SamplingParams  # the engine's own verified copy: later changes by the caller do not reach it
    max_tokens: int  # resolved against the room left in the context


class RequestChecker:
    """Validates (prompt, params) against one engine's model, context and KV cache."""

    def __init__(self, input_processor: InputProcessor, vocab_size: int,
                 structured: Optional[StructuredOutputManager]) -> None:
        self.input_processor = input_processor
        self.vocab_size = vocab_size
        self.structured = structured  # None without a tokenizer

    def check(self, prompt: PromptType, params: Optional[SamplingParams]) -> CheckedRequest:
        """Raises ValueError/TypeError saying what to change; returns the request's checked parts."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()
        processed = self.input_processor.process_prompt(prompt)
        prompt_len = len(processed.prompt_token_ids)
        for field_name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = next((t for t in ids if t >= self.vocab_size), None)
            if bad is not None:
                raise invalid(f"token id {bad} in {field_name} is outside the vocabulary [0, {self.vocab_size})",
                              field_name)
        self.compile_structured_outputs(params)  # bad specs fail here; a cache hit when precompiled
        max_tokens = self.input_processor.resolve_max_tokens(params, prompt_len)
        self.input_processor.check_fits(params, prompt_len, max_tokens)
        return CheckedRequest(processed, params, max_tokens)

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile (and cache) the grammar of `params`, if any; a bad spec raises ValueError/TypeError
        with .param = "structured_outputs". Thread-safe (the compiler's cache has a lock)."""
        if params.structured_outputs is None:
            return
        if self.structured is None:
            raise invalid("structured outputs need a tokenizer; this engine runs with skip_tokenizer_init=True",
                          "structured_outputs")
        try:
            self.structured.validate(params.structured_outputs)
        except (ValueError, TypeError) as e:
            raise invalid(str(e), "structured_outputs", type(e)) from None
