"""Turn user input (text, token ids, or a vLLM-style dict) into validated prompt token ids.

Every rejection is a ValueError/TypeError that says what to change; nothing invalid
reaches the scheduler, so one bad request never disturbs the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from nanovllm.engine.kv_cache_manager import blocks_needed, window_blocks_needed
from nanovllm.sampling_params import SamplingParams, require_valid_unicode

PromptType = Union[str, list[int], dict]


def invalid(message: str, param: Optional[str], error: type = ValueError) -> Exception:
    """A ValueError (or `error`) naming the request field it is about (the server's `param`)."""
    e = error(message)
    e.param = param
    return e


def longest_token_chars(tokenizer) -> Optional[int]:
    """Characters in the tokenizer's longest vocabulary entry (None when it cannot tell).

    No token covers more characters of the text than its own vocabulary string has (byte-level
    BPE spells each byte as one character, SentencePiece each character as one), so a text
    longer than `longest * max_model_len` characters cannot fit in the context: it is refused
    before the tokenizer spends seconds on it.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # not every tokenizer can list its vocabulary
        return None
    return max((len(t) for t in vocab), default=None) or None


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
        longest = longest_token_chars(tokenizer) if tokenizer is not None else None
        # longest text that could still fit in the context (None: no cheap bound known)
        self.max_prompt_chars: Optional[int] = longest * max_model_len if longest else None

    def check_text(self, text, param: str = "prompt") -> None:
        """Refuse text that cannot be tokenized or cannot fit, before spending time on it."""
        if not isinstance(text, str):
            raise invalid(f"{param} text must be a string, got {type(text).__name__}", param, TypeError)
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise invalid(
                f"{param} has {len(text)} characters, more than any text that fits in max_model_len="
                f"{self.max_model_len} tokens can have ({self.max_prompt_chars}): shorten it", param)
        try:
            require_valid_unicode(param, text)
        except ValueError as e:
            raise invalid(str(e), param) from None

    def tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Checked text -> token ids (a thread-safe call: servers run it off their event loop)."""
        self.check_text(text, param)
        if self.tokenizer is None:
            raise invalid("this engine was started with skip_tokenizer_init=True: pass prompt_token_ids, not text",
                          param)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise invalid(f"prompt dict has unknown keys {sorted(unknown)}; use 'prompt' or 'prompt_token_ids'",
                              "prompt", TypeError)
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
        if text == "":
            raise invalid("prompt is empty: give at least one character or one token id", "prompt")
        return self._from_ids(self.tokenize(text), text)

    def _from_ids(self, ids, text) -> ProcessedPrompt:
        if not isinstance(ids, (list, tuple)):
            raise invalid(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}", "prompt", TypeError)
        if len(ids) == 0:
            raise invalid("prompt is empty: give at least one token id", "prompt")
        if len(ids) >= self.max_model_len:  # before the per-token checks: a huge list costs nothing
            raise invalid(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} (room is needed for at "
                "least one generated token): shorten the prompt or raise max_model_len", "prompt")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise invalid(f"prompt_token_ids must contain ints, got {t!r}", "prompt", TypeError)
            if not 0 <= t < self.vocab_size:
                raise invalid(f"token id {t} is out of the vocabulary range [0, {self.vocab_size})", "prompt")
        return ProcessedPrompt(text, list(ids))

    def resolve_max_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        """max_tokens for this prompt: None and the default are clamped to the room left in the context;
        an explicit value that does not fit is refused, as the server's 400 does."""
        room = self.max_model_len - prompt_len
        if params.max_tokens is None:
            return room
        if params.max_tokens > room and not params.max_tokens_is_default:
            raise invalid(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {prompt_len} tokens and max_model_len "
                f"is {self.max_model_len}; lower max_tokens to at most {room}, pass max_tokens=None (up to the "
                f"context), or shorten the prompt", "max_tokens")
        return min(params.max_tokens, room)

    def check_fits(self, params: SamplingParams, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that could never run, even alone (it would wait forever)."""
        if params.n > self.max_num_seqs:
            raise invalid(f"n={params.n} exceeds max_num_seqs={self.max_num_seqs}; lower n or raise max_num_seqs", "n")
        if (not self.enable_chunked_prefill and self.max_num_batched_tokens is not None
                and prompt_len > self.max_num_batched_tokens):
            raise invalid(
                f"prompt has {prompt_len} tokens but max_num_batched_tokens is {self.max_num_batched_tokens} and "
                f"chunked prefill is off, so it could never be scheduled: raise max_num_batched_tokens to at least "
                f"{prompt_len}, enable chunked prefill, or shorten the prompt", "prompt")
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
            raise invalid(
                f"request needs up to {need} KV cache blocks ({prompt_len} prompt + {max_tokens} new tokens, n={params.n}) "
                f"but the cache holds only {self.num_kv_blocks}: lower max_tokens or n, or give the cache more memory",
                "max_tokens")
