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

from nanovllm.cli.args import add_quantization_args, quantization_kwargs

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "alice_chapter1.txt")


def load_text(path: Optional[str] = None) -> str:
    path = path or DEFAULT_TEXT
    if not os.path.isfile(path):
        raise ValueError(f"perplexity text {path!r} not found; pass --text FILE")
    with open(path, encoding="utf-8") as f:
        return f.read()


DEFAULT_WINDOW = 512  # tokens per scored window: attention cost grows with its square


def perplexity(llm, token_ids: list[int], window: Optional[int] = DEFAULT_WINDOW) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of `token_ids` under `llm` (an `LLM`).

    The ids are cut into consecutive windows of `window` tokens (None: one window), run as
    one batch of prompts; each window's tokens after its first are scored given the window's
    earlier tokens only. Windows keep the CPU test quick (attention over 2.9k tokens costs as
    much as the rest of the forward) at the price of less context early in each window."""
    from nanovllm import SamplingParams

    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    size = window or len(token_ids)
    windows = [list(token_ids[i : i + size]) for i in range(0, len(token_ids), size)]
    windows = [w for w in windows if len(w) >= 2]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, n = 0.0, 0
    for ids, out in zip(windows, outs):
        for tok, entry in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= entry[tok].logprob
        n += len(ids) - 1
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
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per scored window (0: the whole text)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cpu-weight-format", default="auto", choices=["auto", "fp16", "fp32"],
                   help="CPU GEMM weights (fp32 = the unquantized reference of a GGUF)")
    add_quantization_args(p)


def run(args) -> int:
    from nanovllm import LLM

    kwargs = quantization_kwargs(args)
    llm = LLM(args.model, device=args.device, cpu_weight_format=args.cpu_weight_format, **kwargs)
    ids = tokenize(llm, load_text(args.text), args.max_tokens)
    max_len = llm.engine.max_model_len
    if len(ids) + 1 > max_len:
        ids = ids[: max_len - 1]
    ppl, n = perplexity(llm, ids, args.window or None)
    print(f"perplexity {ppl:.4f} over {n} tokens (model {args.model or 'bundled'}, "
          f"quantization {kwargs.get('quantization', 'none')})")
    return 0
