"""IncrementalDetokenizer with real (offline-built) tokenizers: byte-level BPE and SentencePiece-style."""

from __future__ import annotations

import pytest
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from nanovllm.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from nanovllm.sampling_params import SamplingParams

EOS = "<|endoftext|>"
CORPUS = [
    "Hello world, this is a small test corpus.",
    "The quick brown fox jumps over the lazy dog. STOP here.",
    "世界你好，日本語のテキストも少し。",
    "Emoji time 🙂 and 🚀 and 👍 done.",
] * 20
MULTIBYTE_TEXT = "Hello 世界 🙂 fox, then 🚀 and 日本語!"


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained in-process; small vocab so emoji stay split into bytes."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS)


@pytest.fixture(scope="module")
def sp_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-style SentencePiece: '▁' word marker, byte fallback, decoder strips the leading space."""
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    words = ["▁Hello", "▁world", "▁the", "▁fox", "▁", "Hello", "world", "STOP", "▁STOP", "!", ","]
    pieces += [(w, -float(len(w))) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzSTOP"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def decode(tok, ids, **kw) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False, **kw)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed ids one by one; the streamed pieces, the last one fetched with finished=True."""
    pieces = []
    for i, token_id in enumerate(ids):
        stopped = detok.update([token_id])
        pieces.append(detok.get_new_text(finished=stopped is not None or i == len(ids) - 1))
        if stopped is not None:
            break
    return pieces


# ----------------------------------------------------------------------------- plain text


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_streamed_pieces_concatenate_to_decode(which, request):
    tok = request.getfixturevalue(which)
    ids = encode(tok, MULTIBYTE_TEXT)
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    pieces = stream(detok, ids)
    assert "".join(pieces) == decode(tok, ids) == MULTIBYTE_TEXT
    assert detok.output_text == MULTIBYTE_TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_char_split_over_tokens_is_never_half_emitted(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = encode(tok, "ok 🚀 ok")
    # precondition: the rocket's 4 bytes span several tokens that are not text on their own
    assert sum("\ufffd" in decode(tok, [i]) for i in ids) >= 2
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    pieces = stream(detok, ids)
    assert sum("🚀" in p for p in pieces) == 1  # emitted whole, by the token that completes it
    assert all("\ufffd" not in p for p in pieces)
    assert sum(p == "" for p in pieces) >= 1  # held while the character was incomplete
    assert "".join(pieces) == "ok 🚀 ok"


def test_sentencepiece_leading_space_uses_prompt_context(sp_tokenizer):
    tok = sp_tokenizer
    prompt = encode(tok, "Hello the")
    full = encode(tok, "Hello the world fox")
    output = full[len(prompt) :]
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    pieces = stream(detok, output)
    assert "".join(pieces) == " world fox"  # the space that separates it from the prompt is kept
    assert decode(tok, full)[len(decode(tok, prompt)) :] == " world fox"


def test_long_output_keeps_window_small(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = encode(tok, MULTIBYTE_TEXT * 30)
    detok = IncrementalDetokenizer(tok, encode(tok, "prompt text"), SamplingParams())
    for token_id in ids:
        detok.update([token_id])
        assert len(detok._ids) <= 8  # prefix + read window, independent of the output length
    assert detok.output_text == MULTIBYTE_TEXT * 30


def test_special_tokens_skipped_or_kept(bpe_tokenizer):
    tok = bpe_tokenizer
    eos = tok.convert_tokens_to_ids(EOS)
    ids = encode(tok, "Hello fox") + [eos] + encode(tok, " world")
    skipped = IncrementalDetokenizer(tok, [], SamplingParams())
    assert "".join(stream(skipped, ids)) == "Hello fox world" == decode(tok, ids, skip_special_tokens=True)
    kept = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False))
    assert "".join(stream(kept, ids)) == f"Hello fox{EOS} world" == decode(tok, ids)


def test_spaces_between_special_tokens_false_glues_adjacent_added_tokens():
    """WordPiece's decoder puts a space between tokens; the flag removes it between added tokens."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "[A]": 3, "[B]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", additional_special_tokens=["[A]", "[B]"])
    ids = [1, 3, 4, 2]
    default = IncrementalDetokenizer(hf, [], SamplingParams(skip_special_tokens=False))
    assert "".join(stream(default, ids)) == "hello [A] [B] world" == decode(hf, ids)
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)
    glued = IncrementalDetokenizer(hf, [], params)
    assert "".join(stream(glued, ids)) == "hello [A][B] world"


# ----------------------------------------------------------------------------- stop strings


def _boundary_stop(tok, text: str) -> tuple[list[int], str, int]:
    """A 2-char stop string made of the last char of one token and the first of the next."""
    ids = encode(tok, text)
    for j in range(1, len(ids)):
        left, right = decode(tok, ids[:j]), decode(tok, ids[: j + 1])
        piece = right[len(left) :]
        if left and piece and left[-1].isalpha() and piece[0].isalpha():
            stop = left[-1] + piece[0]
            if text.find(stop) == len(left) - 1:  # first occurrence is this boundary
                return ids, stop, len(left) - 1
    raise AssertionError("no usable token boundary")


def test_stop_string_spanning_two_tokens_is_caught_and_trimmed(bpe_tokenizer):
    tok = bpe_tokenizer
    text = "The quick brown fox jumps over"
    ids, stop, at = _boundary_stop(tok, text)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["zzz", stop]))
    matched = None
    for token_id in ids:
        matched = detok.update([token_id])
        if matched:
            break
    assert matched == stop and detok.stop_reason == stop and detok.finished
    assert detok.output_text == text[:at]
    assert detok.update(encode(tok, " more")) is None  # finished: later tokens are ignored
    assert detok.output_text == text[:at]


def test_include_stop_str_in_output_keeps_it(bpe_tokenizer):
    tok = bpe_tokenizer
    text = "The quick brown fox jumps over"
    ids, stop, at = _boundary_stop(tok, text)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=stop, include_stop_str_in_output=True))
    pieces = stream(detok, ids)
    assert detok.stop_reason == stop
    assert detok.output_text == text[: at + len(stop)] == "".join(pieces)


def test_stop_string_is_never_streamed(bpe_tokenizer):
    tok = bpe_tokenizer
    text = "Hello world, this is STOP here and more"
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP h", "is a"]))
    streamed = ""
    for token_id in ids:
        matched = detok.update([token_id])
        streamed += detok.get_new_text(finished=matched is not None)
        assert "ST" not in streamed  # not even the start of the stop string leaks
        assert detok.output_text.startswith(streamed)
        if matched:
            break
    assert matched == "STOP h"
    assert streamed == detok.output_text == "Hello world, this is "


def test_held_back_prefix_is_released_when_finished(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = encode(tok, "the lazy dog. ST")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"]))
    assert detok.update(ids) is None
    assert detok.get_new_text() == "the lazy dog. "  # "ST" could still become "STOP"
    assert detok.get_new_text() == ""
    assert detok.get_new_text(finished=True) == "ST"  # e.g. max_tokens reached
    assert detok.output_text == "the lazy dog. ST"


def test_stop_strings_ignored_within_min_tokens(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = encode(tok, "fox fox fox")
    first_fox = len(encode(tok, "fox"))
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["fox"], min_tokens=first_fox, max_tokens=50))
    matched = [detok.update([t]) for t in ids]
    assert matched.index("fox") > first_fox - 1
    assert detok.output_text == "fox "


def test_stop_terminated_leaves_out_the_stop_token(bpe_tokenizer):
    tok = bpe_tokenizer
    eos = tok.convert_tokens_to_ids(EOS)
    ids = encode(tok, "Hello fox")
    stop_id = ids[-1]  # pretend the last word piece is a stop_token_id
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop_token_ids=[stop_id], skip_special_tokens=False))
    assert detok.update(ids, stop_terminated=True) is None
    assert detok.finished and detok.output_text == decode(tok, ids[:-1])
    kept = IncrementalDetokenizer(tok, [], SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False))
    kept.update(ids + [eos], stop_terminated=True)
    assert kept.output_text == "Hello fox" + EOS


# ----------------------------------------------------------------------------- odds and ends


def test_no_tokenizer_is_graceful():
    detok = IncrementalDetokenizer(None, [1, 2, 3], SamplingParams(stop=["x"]))
    assert detok.update([4, 5, 6]) is None
    assert detok.output_text == "" and detok.get_new_text() == "" and detok.decode_token(4) == ""
    assert detok.num_output_tokens == 3


def test_decode_token_for_logprobs(bpe_tokenizer):
    tok = bpe_tokenizer
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    fox = encode(tok, " fox")
    assert "".join(detok.decode_token(t) for t in fox) == " fox"
    assert detok.decode_token(tok.convert_tokens_to_ids(EOS)) == EOS


def test_invalid_bytes_do_not_stall_forever(bpe_tokenizer):
    """A run of bytes that never forms UTF-8 is emitted (as U+FFFD) once the window is too long."""
    tok = bpe_tokenizer
    lone_lead = tok.convert_tokens_to_ids("ð")  # byte 0xF0: a 4-byte lead with no continuation
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for _ in range(40):
        detok.update([lone_lead])
    assert len(detok._ids) <= 2 * MAX_PENDING_TOKENS  # flushed window + pending tokens
    assert detok.output_text and set(detok.output_text) == {"\ufffd"}
