"""Offline replay of the serve benchmark's workload: the same requests, arrival pattern and concurrency
cap as `nanovllm bench serve`, driven straight through LLMEngine (no HTTP, no event loop, no SSE).

Served output tok/s divided by this run's is the cost of the HTTP path on exactly the same requests.
Latencies are measured the way the client measures them, from the moment a request starts (released
and under the concurrency cap) to the end of the engine step that produced each token.

    nanovllm bench throughput --workload serve --model benchmarks/configs/qwen3-0.6b --max-model-len 2048 \\
        --num-prompts 512 --input-len 512 --output-len 256 --max-concurrency 64 --ignore-eos --temperature 0.6
"""

from __future__ import annotations

import os
import threading
import time

from nanovllm.bench.serve import RequestResult, print_summary, save, summarize
from nanovllm.cli.args import parallel_kwargs
from nanovllm.bench.workload import ServeWorkload, make_workload


def replay(engine, workload: ServeWorkload, params_list) -> tuple[list[RequestResult], float]:
    """Run `workload` on an idle LLMEngine; (one result per request, wall seconds)."""
    n = len(workload)
    release = workload.release_times()
    cap = workload.max_concurrency or n
    results = [RequestResult(prompt_len=plen) for plen in workload.prompt_lens]
    started = [0.0] * n
    last = [0.0] * n
    next_req = in_flight = 0
    t0 = time.perf_counter()
    while next_req < n or engine.has_unfinished_requests():
        now = time.perf_counter()
        while next_req < n and in_flight < cap and release[next_req] <= now - t0:
            prompt = workload.prompts[next_req]
            engine.add_request(str(next_req), {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt,
                               params_list[next_req])
            started[next_req] = time.perf_counter()
            next_req += 1
            in_flight += 1
        if not engine.has_unfinished_requests():  # idle until the next release
            time.sleep(max(0.0, release[next_req] - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            i = int(out.request_id)
            res = results[i]
            new_tokens = sum(len(c.token_ids) for c in out.outputs)
            if new_tokens:
                if res.output_tokens == 0:
                    res.ttft = now - started[i]
                else:
                    res.itl.append(now - last[i])
                last[i] = now
                res.output_tokens += new_tokens
            if out.finished:
                res.e2e = now - started[i]
                res.ok = res.output_tokens > 0
                res.error = "" if res.ok else "no tokens were generated"
                in_flight -= 1
    return results, time.perf_counter() - t0


WARMUP_OUTPUT_TOKENS = 16


def run_on_engine_thread(fn, *args):
    """fn(*args) on a thread of its own, as the server's engine runs (AsyncLLMEngine's thread).

    On CPU this matters: torch's OpenMP-parallel ops run many times slower from the main
    thread than from another thread when the cores are oversubscribed (measured 55 vs 2,000
    tok/s with a tiny model on 2 busy cores), which would make the replay look slower than
    serving for reasons that have nothing to do with HTTP.
    """
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="nanovllm-replay")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def warm_up(llm, workload: ServeWorkload) -> None:
    """Compile the kernels the run will meet (one concurrency's worth of same-length prompts) outside the timing.

    The prompts are the workload's first ones reversed, so the prefix cache holds nothing the run can reuse.
    """
    from nanovllm import SamplingParams

    n = min(len(workload), workload.max_concurrency or len(workload))
    prompts = [p[::-1] for p in workload.prompts[:n]]
    llm.generate([{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts],
                 SamplingParams(temperature=workload.temperature, ignore_eos=True,
                                max_tokens=min(WARMUP_OUTPUT_TOKENS, workload.output_len)), use_tqdm=False)


def engine_kwargs(args) -> dict:
    kwargs = {"max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager,
              "async_scheduling": args.async_scheduling, "gpu_memory_utilization": args.gpu_memory_utilization}
    for name in ("max_num_batched_tokens", "max_num_seqs", "max_prefill_tokens_while_decoding"):
        if getattr(args, name, None):
            kwargs[name] = getattr(args, name)
    return {**kwargs, **parallel_kwargs(args)}  # -tp / --distributed-executor-backend


def run_serve_workload(args) -> int:
    """`bench throughput --workload serve`: one serve.csv row (bench=replay) and serve_replay.png."""
    from nanovllm import LLM, RequestOutputKind, SamplingParams

    workload = make_workload(args, args.prompt_kind)
    llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=args.prompt_kind == "tokens",
              **engine_kwargs(args))
    warm_up(llm, workload)
    params = SamplingParams(temperature=workload.temperature, max_tokens=workload.output_len,
                            ignore_eos=workload.ignore_eos, output_kind=RequestOutputKind.DELTA)
    results, duration = run_on_engine_thread(replay, llm.engine, workload, [params] * len(workload))
    args.endpoint = "offline"
    model = os.path.basename(os.path.normpath(args.model))
    summary = summarize(args, model, results, duration)
    print_summary(summary)
    if not args.no_save:
        csv_path, png_path = save(args, summary, bench="replay")
        print(f"saved {csv_path} and {png_path}")
    return 1 if summary["failed"] else 0
