"""CPU throughput on the bundled SmolLM2-135M: nanovllm vs HF transformers `generate`, same run.

8 prompts x 128 new tokens, greedy, EOS ignored, both engines batching all 8 prompts.
Appends a CSV row per engine to benchmarks/results/cpu_throughput.csv and writes a PNG.

    python benchmarks/cpu_throughput.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench.report import RESULTS_DIR, append_rows, bar_plot, base_row
from nanovllm.loading.resolve import bundled_model_path

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three uses of copper:",
    "Once upon a time, in a small village by the mountains,",
    "The main difference between TCP and UDP is",
    "Translate to French: The weather is nice today.",
    "A good recipe for pancakes needs",
]


def run_nanovllm(num_tokens: int) -> tuple[float, int]:
    llm = LLM(device="cpu", dtype="float32", max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_hf(num_tokens: int) -> tuple[float, int]:
    """HF transformers `generate` on the same weights (the GGUF tensors, dequantized to fp32).

    transformers' own GGUF loading needs `accelerate`; the tensors are the same either way
    (tests/loading checks they are bit-equal), so the HF model is built from our reader.
    """
    from transformers import AutoModelForCausalLM

    from nanovllm.loading.gguf_loader import load_gguf_tokenizer, read_gguf_checkpoint

    ckpt = read_gguf_checkpoint(bundled_model_path())
    tok = load_gguf_tokenizer(bundled_model_path())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_config(ckpt.hf_config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dict(ckpt.iter_tensors()), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"HF model does not match the checkpoint: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(do_sample=False, max_new_tokens=num_tokens, min_new_tokens=num_tokens, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        model.generate(**tok(PROMPTS[:2], return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - t0
    return elapsed, (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu_throughput.csv"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for engine, fn in (("hf-transformers", run_hf), ("nanovllm", run_nanovllm)):
        elapsed, tokens = fn(args.max_tokens)
        rows.append({**base_row(), "engine": engine, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)",
                     "num_prompts": len(PROMPTS), "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
                     "output_tokens": tokens, "seconds": round(elapsed, 3),
                     "output_tok_per_s": round(tokens / elapsed, 1)})
    ratio = rows[1]["output_tok_per_s"] / rows[0]["output_tok_per_s"]
    for r in rows:
        r["speedup_vs_hf"] = round(r["output_tok_per_s"] / rows[0]["output_tok_per_s"], 2)
    path = append_rows(args.out, rows)
    bar_plot(os.path.splitext(path)[0] + ".png", [r["engine"] for r in rows], [r["output_tok_per_s"] for r in rows],
             "output tokens/s", f"CPU, SmolLM2-135M, 8 prompts x {args.max_tokens} tokens ({rows[0]['device']})")
    for r in rows:
        print(f"{r['engine']:>16}: {r['output_tokens']} tokens in {r['seconds']:.2f} s = {r['output_tok_per_s']:.1f} tok/s")
    print(f"nanovllm / HF = {ratio:.2f}x   (CSV: {path})")


if __name__ == "__main__":
    main()
