"""FP8 KV cache quality on a random-weight model: first tokens and first-step log-probs against fp32.

Random weights give near-flat logits, so long greedy runs diverge even between two bf16
implementations; what is measured is the first step. Three engines share the same weights
(the 16-bit model's, upcast exactly into the fp32 one): an fp32 reference (fp32 weights,
activations and KV cache), the model's dtype with its own KV cache, and the same with an fp8 KV
cache. Per prompt (random token ids, seeded, the throughput workload's lengths):

- the greedy first token of each engine (fp8 should agree with the 16-bit cache in >= 7 of 8);
- the log-probs, under each engine, of the reference's top-20 first-step tokens (each scored as
  the last token of prompt + [token], `prompt_logprobs`, so every engine scores the same 20
  tokens), and their mean absolute error against the reference.

    nanovllm bench kv-quality --model benchmarks/configs/qwen3-0.6b      # GPU, ~1 min
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row

NUM_PROMPTS = 8
TOP_K = 20  # the OpenAI API's (and vLLM's) largest top_logprobs
PROMPT_SEED = 1
MIN_PROMPT, MAX_PROMPT = 100, 1024  # the throughput workload's prompt lengths
TOKEN_ID_MAX = 10000
NUM_KV_BLOCKS = 1024  # 16k tokens: the prompts and their scored continuations, not a memory-sized cache


@dataclass
class Quality:
    """First-step agreement and log-prob error of one KV cache format against the fp32 reference."""

    kv_cache_dtype: str
    first_token_agree_ref: int  # prompts whose greedy first token equals the fp32 reference's
    first_token_agree_16bit: int  # ... equals the 16-bit KV cache's (same engine dtype)
    top_logprob_mae: float  # mean |logprob - reference logprob| over the reference's top-k tokens
    num_prompts: int


def make_prompts(num_prompts: int, max_len: int, vocab: int) -> list[list[int]]:
    rng = random.Random(PROMPT_SEED)
    top = min(TOKEN_ID_MAX, vocab - 1)
    return [[rng.randint(0, top) for _ in range(rng.randint(min(MIN_PROMPT, max_len), max_len))]
            for _ in range(num_prompts)]


def build(model: str, dtype: str, kv_cache_dtype: str, device: str, max_model_len: int):
    from nanovllm import LLM

    return LLM(model, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
               device=device, enforce_eager=True, num_kv_blocks=NUM_KV_BLOCKS, max_model_len=max_model_len,
               gemv="off", cpu_weight_format="fp32")


def copy_weights(src, dst) -> None:
    """dst's parameters := src's, converted (bf16 -> fp32 is exact): both engines see one model."""
    import torch

    a = dict(src.engine.executor.worker.model.named_parameters())
    b = dict(dst.engine.executor.worker.model.named_parameters())
    if a.keys() != b.keys():
        raise ValueError("the reference and the measured engine built different parameter sets")
    with torch.no_grad():
        for name, p in b.items():
            p.copy_(a[name].to(p.dtype))


def first_tokens(llm, prompts) -> list[int]:
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    return [o.outputs[0].token_ids[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]


def top_tokens(llm, prompts, k: int) -> list[list[int]]:
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=k)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [sorted(o.outputs[0].logprobs[0], key=lambda t: -o.outputs[0].logprobs[0][t].logprob)[:k] for o in outs]


def score(llm, prompts, candidates: list[list[int]]) -> list[list[float]]:
    """log p(token | prompt) for each candidate token of each prompt, as the last prompt token's logprob."""
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    flat = [{"prompt_token_ids": p + [t]} for p, toks in zip(prompts, candidates) for t in toks]
    outs = iter(llm.generate(flat, params, use_tqdm=False))
    return [[next(outs).prompt_logprobs[-1][t].logprob for t in toks] for toks in candidates]


def measure(model: str, device: str = "cuda", dtype: str = "bfloat16", num_prompts: int = NUM_PROMPTS,
            top_k: int = TOP_K, max_prompt_len: int = MAX_PROMPT) -> list[Quality]:
    """Quality of the `dtype` KV cache and of the fp8 KV cache against the fp32 reference."""
    max_model_len = max_prompt_len + 2
    engines = {"auto": build(model, dtype, "auto", device, max_model_len),
               "fp8": build(model, dtype, "fp8", device, max_model_len)}
    ref = build(model, "float32", "auto", device, max_model_len)
    copy_weights(engines["auto"], ref)
    vocab = ref.engine.executor.worker.model_info.hf_config.vocab_size
    prompts = make_prompts(num_prompts, max_prompt_len, vocab)
    ref_first = first_tokens(ref, prompts)
    cands = top_tokens(ref, prompts, top_k)
    ref_lp = score(ref, prompts, cands)
    firsts = {kv: first_tokens(llm, prompts) for kv, llm in engines.items()}
    out = []
    for kv, llm in engines.items():
        lp = score(llm, prompts, cands)
        errs = [abs(x - y) for row, ref_row in zip(lp, ref_lp) for x, y in zip(row, ref_row)]
        out.append(Quality(kv if kv == "fp8" else dtype, sum(a == b for a, b in zip(firsts[kv], ref_first)),
                           sum(a == b for a, b in zip(firsts[kv], firsts["auto"])), sum(errs) / len(errs),
                           num_prompts))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model dir with a config.json (random weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="the measured engines' dtype (the reference is fp32)")
    p.add_argument("--num-prompts", type=int, default=NUM_PROMPTS)
    p.add_argument("--top-k", type=int, default=TOP_K)
    p.add_argument("--max-prompt-len", type=int, default=MAX_PROMPT,
                   help=f"longest random prompt (default {MAX_PROMPT}; within the model's max_position_embeddings)")
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "kv_quality.csv"))


def run(args) -> int:
    results = measure(args.model, args.device, args.dtype, args.num_prompts, args.top_k, args.max_prompt_len)
    name = os.path.basename(os.path.normpath(args.model))
    rows = [{**base_row(), "model": name, **vars(q)} for q in results]
    append_rows(args.csv, rows)
    for q in results:
        print(f"{name} KV {q.kv_cache_dtype}: first token = fp32 reference's in {q.first_token_agree_ref}/"
              f"{q.num_prompts}, = {args.dtype} KV's in {q.first_token_agree_16bit}/{q.num_prompts}; "
              f"top-{args.top_k} first-step logprob MAE vs fp32 {q.top_logprob_mae:.4f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
