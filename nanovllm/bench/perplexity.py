"""Perplexity of a model on a fixed text: the quality check of weight quantization.

The text (default `tests/data/alice_chapter1.txt`: chapter I of Lewis Carroll's "Alice's
Adventures in Wonderland", 1865, public domain, from Project Gutenberg) is tokenized once and
run as one prompt with `prompt_logprobs=0`; perplexity = exp(mean negative log-likelihood of
each token given the ones before it), over the tokens after the first.

    nanovllm bench perplexity [--model M] [--quantization int8|int4|fp8] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Optional

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "alice_chapter1.txt")


def load_text(path: Optional[str] = None) -> str:
    path = path or DEFAULT_TEXT
    if not os.path.isfile(path):
        raise ValueError(f"perplexity text {path!r} not found; pass --text FILE")
    with open(path, encoding="utf-8") as f:
        return f.read()


def perplexity(llm, token_ids: list[int]) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of `token_ids` under `llm` (an `LLM`)."""
    from nanovllm import SamplingParams

    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)[0]
    nll = 0.0
    for tok, entry in zip(token_ids[1:], out.prompt_logprobs[1:]):
        nll -= entry[tok].logprob
    n = len(token_ids) - 1
    return math.exp(nll / n), n


def tokenize(llm, text: str, max_tokens: Optional[int] = None) -> list[int]:
    tokenizer = llm.get_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos] + ids
    return ids[:max_tokens] if max_tokens else ids


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: the bundled SmolLM2)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: tests/data/alice_chapter1.txt)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from nanovllm import LLM

    kwargs = {}
    if getattr(args, "quantization", None):
        kwargs["quantization"] = args.quantization
    llm = LLM(args.model, device=args.device, **kwargs)
    ids = tokenize(llm, load_text(args.text), args.max_tokens)
    max_len = llm.engine.max_model_len
    if len(ids) + 1 > max_len:
        ids = ids[: max_len - 1]
    ppl, n = perplexity(llm, ids)
    print(f"perplexity {ppl:.4f} over {n} tokens (model {args.model or 'bundled'}, "
          f"quantization {kwargs.get('quantization', 'none')})")
    return 0
