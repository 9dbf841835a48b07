"""Turn user input (text, token ids, or a vLLM-style dict) into validated prompt token ids.

Every rejection is a ValueError/TypeError that says what to change; nothing invalid
reaches the scheduler, so one bad request never disturbs the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from nanovllm.engine.kv_cache_manager import blocks_needed, window_blocks_needed
from nanovllm.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict]


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: Optional[str]
    prompt_token_ids: list[int]


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 num_kv_blocks: int, block_size: int, max_num_batched_tokens: Optional[int] = None,
                 enable_chunked_prefill: bool = True, sliding_window: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.sliding_window = sliding_window  # the KV cache frees blocks before it (kv_cache_manager.py)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise TypeError(f"prompt dict has unknown keys {sorted(unknown)}; use 'prompt' or 'prompt_token_ids'")
            if "prompt_token_ids" in prompt:
                return self._from_ids(prompt["prompt_token_ids"], prompt.get("prompt"))
            if "prompt" in prompt:
                return self._from_text(prompt["prompt"])
            raise TypeError("prompt dict needs a 'prompt' (text) or 'prompt_token_ids' (list of ints) key")
        if isinstance(prompt, str):
            return self._from_text(prompt)
        if isinstance(prompt, (list, tuple)):
            return self._from_ids(prompt, None)
        raise TypeError(
            f"prompt must be a string, a list of token ids or a dict with 'prompt_token_ids', got {type(prompt).__name__}"
        )

    def _from_text(self, text) -> ProcessedPrompt:
        if not isinstance(text, str):
            raise TypeError(f"prompt text must be a string, got {type(text).__name__}")
        if text == "":
            raise ValueError("prompt is empty: give at least one character or one token id")
        if self.tokenizer is None:
            raise ValueError("this engine was started with skip_tokenizer_init=True: pass prompt_token_ids, not text")
        ids = self.tokenizer(text).input_ids
        return self._from_ids(ids, text)

    def _from_ids(self, ids, text) -> ProcessedPrompt:
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        if len(ids) == 0:
            raise ValueError("prompt is empty: give at least one token id")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"prompt_token_ids must contain ints, got {t!r}")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is out of the vocabulary range [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} (room is needed for at "
                "least one generated token): shorten the prompt or raise max_model_len"
            )
        return ProcessedPrompt(text, list(ids))

    def resolve_max_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def check_fits(self, params: SamplingParams, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that could never run, even alone (it would wait forever)."""
        if params.n > self.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.max_num_seqs}; lower n or raise max_num_seqs")
        if (not self.enable_chunked_prefill and self.max_num_batched_tokens is not None
                and prompt_len > self.max_num_batched_tokens):
            raise ValueError(
                f"prompt has {prompt_len} tokens but max_num_batched_tokens is {self.max_num_batched_tokens} and "
                f"chunked prefill is off, so it could never be scheduled: raise max_num_batched_tokens to at least "
                f"{prompt_len}, enable chunked prefill, or shorten the prompt"
            )
        need = blocks_needed(prompt_len + max_tokens, self.block_size)
        need += (params.n - 1) * (blocks_needed(max_tokens, self.block_size) + 1)
        if self.sliding_window is not None and self.max_num_batched_tokens is not None:
            # blocks before the window are freed: a step's chunk (a prompt, whole without chunked
            # prefill) plus the window before it is what a completion holds at once
            chunk = self.max_num_batched_tokens
            if not self.enable_chunked_prefill:
                chunk = max(chunk, prompt_len)
            chunk = min(chunk, prompt_len + max_tokens)
            need = min(need, params.n * window_blocks_needed(self.sliding_window, chunk, self.block_size))
        if need > self.num_kv_blocks:
            raise ValueError(
                f"request needs up to {need} KV cache blocks ({prompt_len} prompt + {max_tokens} new tokens, n={params.n}) "
                f"but the cache holds only {self.num_kv_blocks}: lower max_tokens or n, or give the cache more memory"
            )
