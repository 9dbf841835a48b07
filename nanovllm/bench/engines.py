"""Engines for benchmarks that build several in one process, and the step loop they are timed with.

`bench prefix` and `bench sweep` build one engine per setting, one after another: each engine's KV
cache is sized for its workload (not from free GPU memory, so nothing depends on how fast the
previous engine's memory came back), and `release` gives cache and graphs back before the next.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from nanovllm.config import DEFAULT_BLOCK_SIZE

SPARE_SEQUENCES = 2  # KV blocks for this many extra full-length sequences (warm-ups, stragglers)


def kv_blocks_for(max_num_seqs: int, max_model_len: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """KV blocks that hold `max_num_seqs` (+ spares) sequences of `max_model_len` tokens."""
    return (max_num_seqs + SPARE_SEQUENCES) * -(-max_model_len // block_size)


def workload_llm(model: str, max_model_len: int, max_num_seqs: int, *, load_format: str = "dummy",
                 device: str = "auto", dtype: str = "auto", num_kv_blocks: Optional[int] = None, **kwargs):
    """An LLM (no tokenizer) whose KV cache holds its workload: num_kv_blocks, by default
    `kv_blocks_for(max_num_seqs, max_model_len)`; kwargs go to the engine."""
    from nanovllm import LLM

    return LLM(model, load_format=load_format, skip_tokenizer_init=True, device=device, dtype=dtype,
               max_model_len=max_model_len, max_num_seqs=max_num_seqs,
               num_kv_blocks=num_kv_blocks or kv_blocks_for(max_num_seqs, max_model_len), **kwargs)


def release(llm) -> None:
    """Give the engine's KV cache and graphs back before the next engine sizes its own."""
    llm.engine.shutdown()
    del llm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


OnTokens = Callable[[object, int, float], None]  # (RequestOutput, new tokens, perf_counter time)


def step(engine, on_tokens: Optional[OnTokens] = None) -> None:
    """One engine step; on_tokens(output, new tokens, time) for each RequestOutput that brought tokens."""
    outs = engine.step()
    now = time.perf_counter()
    if on_tokens is not None:
        for out in outs:
            n = sum(len(c.token_ids) for c in out.outputs)
            if n:
                on_tokens(out, n, now)


def drive(engine, on_tokens: Optional[OnTokens] = None, until: Optional[Callable[[], bool]] = None) -> None:
    """Step the engine until nothing is left (or `until()`)."""
    while engine.has_unfinished_requests() and not (until and until()):
        step(engine, on_tokens)


@dataclass
class TimedRun:
    """When a batch of requests ran: its wall-clock window, each request's first tokens and
    every step's new tokens (perf_counter times)."""

    start: float
    end: float = 0.0
    first: dict = field(default_factory=dict)  # request id -> time its first tokens arrived
    events: list = field(default_factory=list)  # (time, new tokens) per output that brought some

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.events)

    @property
    def all_started(self) -> float:
        """When the last request got its first token: decoding alone from then on."""
        return max(self.first.values())

    def decode_tok_per_s(self) -> float:
        decoded = sum(n for t, n in self.events if t > self.all_started)
        return decoded / max(self.end - self.all_started, 1e-9)


def timed_run(engine, requests: list, params) -> TimedRun:
    """Add `requests` ([(request id, prompt)]) with `params` and step the engine until all finish."""
    run = TimedRun(time.perf_counter())

    def on_tokens(out, n, now):
        run.first.setdefault(out.request_id, now)
        run.events.append((now, n))

    for rid, prompt in requests:
        engine.add_request(rid, prompt, params)
    drive(engine, on_tokens)
    run.end = time.perf_counter()
    return run
