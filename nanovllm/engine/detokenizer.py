"""Incremental detokenizer: token ids -> text, one step at a time, with stop strings.

Why not decode each token alone: tokens are not independent pieces of text. A multi-byte
character (emoji, CJK) can be split over several byte tokens, SentencePiece decoders strip
the leading space of the first token of whatever they decode, and some decoders merge
neighbouring tokens. So, like vLLM, each new token is decoded inside a short window of
the tokens before it:

    ids:    ... | prefix_offset ........ read_offset ........ len(ids)
    prefix_text = decode(ids[prefix_offset:read_offset])   (already emitted)
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]

The delta is emitted once it is longer than the prefix and does not end in U+FFFD (an
incomplete UTF-8 sequence); then the window slides to the new tokens. The window starts
with the last few prompt tokens, so the first output token decodes in context (the leading
space of " Paris" after "The capital of France is" is kept). Per-step cost depends on the
window, never on the output length.

Stop strings are searched only in the new text plus the `len(stop) - 1` characters before
it; the text is cut at the stop string's start (or after its end with
include_stop_str_in_output). Streaming deltas (`get_new_text`) hold back any tail that could
still grow into a stop string, so a stop string is never half-streamed.

Torch-free, like the rest of engine/.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from nanovllm.sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output tokens (vLLM's value).
INITIAL_PREFIX_TOKENS = 5
# A UTF-8 character needs at most 4 byte tokens; if the text still ends in U+FFFD after this
# many undecoded tokens the bytes are invalid for good (or the model emitted U+FFFD itself):
# emit them as they are instead of letting the window, and the per-step cost, grow.
MAX_PENDING_TOKENS = 16
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one request's output, built token by token (see the module docstring)."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.stop_strings: list[str] = list(params.stop) if tokenizer is not None else []
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.num_output_tokens = 0
        self.stop_reason: Optional[str] = None  # the stop string that ended the text
        self.finished = False  # a stop string matched, or update(..., stop_terminated=True)
        # Hold back streamed text only when a stop string may have to be cut out of it.
        self._hold_back = bool(self.stop_strings) and not self.include_stop_str_in_output

        self._text = ""
        self._num_streamed = 0  # chars of _text already returned by get_new_text
        # Decoding window: the last prompt tokens, then the output tokens not yet slid past.
        prompt_tail = prompt_token_ids[max(0, len(prompt_token_ids) - INITIAL_PREFIX_TOKENS) :]
        self._ids: list[int] = [int(t) for t in prompt_tail]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._decode = _make_decode(tokenizer, params) if tokenizer is not None else None

    # ------------------------------------------------------------------ text
    @property
    def output_text(self) -> str:
        """All text so far (a matched stop string trimmed unless include_stop_str_in_output)."""
        return self._text

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> Optional[str]:
        """Append tokens; returns the stop string that matched, else None.

        On a match the request must finish with finish_reason 'stop' and stop_reason=<that string>;
        later calls are ignored. `stop_terminated=True` says the last token ended the request
        (EOS or a stop_token_id, checked by the scheduler): its text is left out, as vLLM does,
        unless include_stop_str_in_output, and no stop string is searched.
        Stop strings are not searched in the text of the first `min_tokens` tokens.
        """
        if self.finished:
            return None
        if self._decode is None:  # no tokenizer (so no stop strings): only count the tokens
            self.num_output_tokens += len(new_token_ids)
            self.finished = stop_terminated
            return None
        num_to_decode = len(new_token_ids)
        if stop_terminated and not self.include_stop_str_in_output:
            num_to_decode -= 1
        search_from = len(self._text)  # stop strings must end after this char
        for i, token_id in enumerate(new_token_ids):
            self.num_output_tokens += 1
            if self._decode is not None and i < num_to_decode:
                self._text += self._decode_next(token_id)
            if self.num_output_tokens <= self.min_tokens:
                search_from = len(self._text)
        if stop_terminated:
            self.finished = True
            return None
        if not self.stop_strings:
            return None
        return self._check_stop_strings(search_from)

    def get_new_text(self, finished: bool = False) -> str:
        """Text not returned by a previous call, for streaming deltas.

        Holds back a tail that could still be the start of a stop string until that is
        decided; pass `finished=True` on the request's last output (e.g. it hit max_tokens)
        to release it. Incomplete UTF-8 characters never reach the text (see _decode_next).
        """
        end = len(self._text)
        if self._hold_back and not (finished or self.finished):
            end -= self._stop_prefix_suffix_len()
        if end <= self._num_streamed:
            return ""
        delta = self._text[self._num_streamed : end]
        self._num_streamed = end
        return delta

    def decode_token(self, token_id: int) -> str:
        """One token's text, for logprob display (special tokens included, as vLLM)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------ internals
    def _decode_next(self, token_id: int) -> str:
        """Add one token to the window; return the text it completes ('' while incomplete)."""
        ids = self._ids
        ids.append(int(token_id))  # plain ints: the Rust decoder refuses numpy scalars
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        complete = len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR)
        if not complete and len(ids) - self._read_offset < MAX_PENDING_TOKENS:
            return ""  # wait: the next tokens may finish the character
        # Slide the window: the tokens just read become the next prefix context.
        del ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(ids)
        return new_text[len(prefix_text) :]

    def _check_stop_strings(self, search_from: int) -> Optional[str]:
        """Find the earliest stop string ending after `search_from`; trim the text there."""
        best_pos, best_stop = -1, None
        for stop in self.stop_strings:
            pos = self._text.find(stop, max(0, search_from - len(stop) + 1))
            if pos != -1 and (best_stop is None or pos < best_pos):
                best_pos, best_stop = pos, stop
        if best_stop is None:
            return None
        end = best_pos + len(best_stop) if self.include_stop_str_in_output else best_pos
        self._text = self._text[:end]
        self._num_streamed = min(self._num_streamed, end)
        self.stop_reason = best_stop
        self.finished = True
        return best_stop

    def _stop_prefix_suffix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def _make_decode(tokenizer, params: SamplingParams) -> Callable[[list[int]], str]:
    """ids -> text under the request's skip_special_tokens / spaces_between_special_tokens.

    Calls the Rust `tokenizers` backend of HF fast tokenizers directly (what their
    `decode` does, minus ~5 us of Python per call, and never the clean-up of spaces);
    any other tokenizer goes through its `decode`.

    spaces_between_special_tokens=True decodes as the tokenizer does. False (with special
    tokens kept) removes whatever separator the tokenizer's decoder puts between two adjacent
    added tokens (e.g. WordPiece's " "): the ids are decoded in pieces split between such
    pairs and the pieces concatenated, as vLLM does for fast tokenizers.
    """
    skip = params.skip_special_tokens
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):

        def plain(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip)

    else:

        def plain(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    if skip or params.spaces_between_special_tokens:
        return plain
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    if not added:
        return plain

    def glued(ids: list[int]) -> str:
        pieces, start = [], 0
        for j in range(1, len(ids)):
            if ids[j] in added and ids[j - 1] in added:
                pieces.append(plain(ids[start:j]))
                start = j
        pieces.append(plain(ids[start:]))
        return "".join(pieces)

    return glued
