"""`nanovllm bench throughput|latency|serve|prefix`: each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "throughput": ("nanovllm.bench.throughput", "offline throughput on nano-vLLM's bench.py workload"),
    "latency": ("nanovllm.bench.latency", "batch-1 decode speed next to the weight-read roofline"),
    "serve": ("nanovllm.bench.serve", "async load generator against an OpenAI-compatible server"),
    "kv-quality": ("nanovllm.bench.kv_quality", "first-step quality of the bf16 and fp8 KV caches against fp32"),
    "prefix": ("nanovllm.bench.prefix", "shared-prefix throughput, cached TTFT, decode gaps with chunked prefill"),
    "timeline": ("nanovllm.bench.timeline", "TTFT by stage from a `serve --request-timeline` CSV (+ PNG)"),
    "perplexity": ("nanovllm.bench.perplexity", "perplexity on a fixed text (the quality check of quantization)"),
}


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (CSV + PNG in benchmarks/results/)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        p = bench_sub.add_parser(name, help=help_text, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(func=module.run, _parser=p, check=getattr(module, "check", None))
