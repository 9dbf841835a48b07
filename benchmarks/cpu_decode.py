"""CPU decode speed of the bundled SmolLM2-135M: its 4-bit GGUF weights kept quantized (the
default) against the previous default, fp16-packed copies (cpu_weight_format="fp16"), same run.

    python benchmarks/cpu_decode.py [--threads 2] [--repeats 5] [--tokens 128]

Batch 1 and batch 8 (the README prompt, greedy, EOS ignored), the two engines alternating so
that a noisy shared host disturbs both alike; the best and the median of the repeats are
printed, and a CSV row per engine and batch goes to benchmarks/results/cpu_decode.csv. Also
checks that both answer the README prompt the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row  # noqa: E402

PROMPT = "The capital of France is"
ENGINES = {"fp16-packed (before)": {"cpu_weight_format": "fp16"}, "4-bit GGUF kept (now)": {}}


def decode_rate(llm, batch: int, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([PROMPT] * batch, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--csv", default=os.path.join(RESULTS_DIR, "cpu_decode.csv"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llms = {name: LLM(device="cpu", max_model_len=1024, **kw) for name, kw in ENGINES.items()}
    answers = {name: llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
               .outputs[0].text for name, llm in llms.items()}
    for name, text in answers.items():
        print(f"{name}: {PROMPT!r} -> {text!r}")
    rates = {(name, b): [] for name in llms for b in (1, 8)}
    for llm in llms.values():
        decode_rate(llm, 2, 8)  # warm-up
    for _ in range(args.repeats):
        for batch in (1, 8):
            for name, llm in llms.items():
                rates[(name, batch)].append(decode_rate(llm, batch, args.tokens))
    rows = []
    for (name, batch), xs in rates.items():
        best, median = max(xs), statistics.median(xs)
        info = llms[name].engine.executor.info
        print(f"{name:24s} batch {batch}: best {best:6.1f} tok/s, median {median:6.1f}  "
              f"(weights {info.param_bytes / 1e6:.0f} MB; {info.quantization or 'fp16-packed'})")
        rows.append({**base_row(), "engine": name, "batch": batch, "threads": torch.get_num_threads(),
                     "best_tok_per_s": round(best, 1), "median_tok_per_s": round(median, 1),
                     "weight_bytes": info.param_bytes, "same_answer": len(set(answers.values())) == 1})
    before, now = list(ENGINES)
    for batch in (1, 8):
        ratio = max(rates[(now, batch)]) / max(rates[(before, batch)])
        print(f"batch {batch}: {ratio:.2f}x (best vs best)")
    print(f"CSV: {append_rows(args.csv, rows)}")


if __name__ == "__main__":
    main()
