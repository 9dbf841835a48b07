"""Run a nanovllm CLI command and log every Triton JIT specialization it builds or loads.

Why. A kernel variant first met inside a timed region costs a compile (hundreds of ms) or,
when Triton's on-disk cache already has it, a load: the difference between a first and a
second process on one machine. This lists each in-memory cache miss with the time since
start, so a benchmark's warm-up can be made to cover them.

    python benchmarks/trace_jit.py bench throughput --model benchmarks/configs/qwen3-0.6b
"""

from __future__ import annotations

import sys
import time

START = time.perf_counter()


def _hook(*args, **kwargs):
    fn = kwargs.get("fn")
    name = getattr(getattr(fn, "fn", fn), "__name__", "?") if fn is not None else "?"
    sig = kwargs.get("repr", "")
    print(f"[jit {time.perf_counter() - START:8.3f}s] {name} {sig[sig.find('('):][:240]}", file=sys.stderr, flush=True)
    return False  # never skip the compile


def main() -> None:
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_cache_hook"):
        raise SystemExit("this Triton has no knobs.runtime.jit_cache_hook")
    knobs.runtime.jit_cache_hook = _hook
    from nanovllm.cli.main import main as cli_main

    raise SystemExit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
