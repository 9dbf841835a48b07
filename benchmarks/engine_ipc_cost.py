"""Host cost of one engine step's outputs crossing from the engine process to the server's process.

    python benchmarks/engine_ipc_cost.py                     # 64 streams, 512-token prompts, 1 token per step
    python benchmarks/engine_ipc_cost.py --streams 256 --steps 2000

Builds the DELTA RequestOutputs of one decode step (what LLMEngine.step returns at batch
`--streams`), then measures with each thread's CPU clock (immune to other jobs' load):
- engine process: encode_outputs + pickle of the StepBatch (what Connection.send does);
- server process: Connection.recv + unpickle + decode_output, over a real spawn Pipe from a
  child process sending `--steps` batches (the reader thread's and engine thread's share);
- for scale, pickling + unpickling the RequestOutput objects themselves, prompts included.
Prints medians in microseconds per step and the batch's size in bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm.engine.engine_ipc import StepBatch, decode_output, encode_outputs  # noqa: E402
from nanovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput  # noqa: E402

STATS = {"num_running": 64, "num_waiting": 0, "kv_cache_usage": 0.5, "num_free_blocks": 100, "num_blocks": 200,
         "prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefix_cache_hit_rate": 0.0, "prompt_tokens_total": 0,
         "generation_tokens_total": 0, "preemptions_total": 0, "last_step_num_tokens": 64,
         "last_step_num_prefill_tokens": 0, "last_step_num_seqs": 64}


def step_outputs(streams: int, prompt_len: int) -> list[RequestOutput]:
    """One decode step's DELTA outputs: one token and its text per stream."""
    now = time.monotonic()
    return [RequestOutput(f"cmpl-{i:032x}-0", "word " * (prompt_len // 2), list(range(prompt_len)),
                          [CompletionOutput(0, " token", [1234 + i])], False,
                          metrics=RequestMetrics(now, now, now, now, now))
            for i in range(streams)]


def batch(outputs: list[RequestOutput], seq: int = 1) -> StepBatch:
    return StepBatch(seq, True, time.monotonic(), time.monotonic(), dict(STATS), encode_outputs(outputs))


def _sender(conn, streams: int, prompt_len: int, steps: int) -> None:
    outputs = step_outputs(streams, prompt_len)
    for i in range(steps):
        conn.send(batch(outputs, i))
    conn.close()


def _median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args()
    outputs = step_outputs(args.streams, args.prompt_len)
    data = pickle.dumps(batch(outputs), pickle.HIGHEST_PROTOCOL)
    send_us = _median_us(lambda: pickle.dumps(batch(outputs), pickle.HIGHEST_PROTOCOL), args.steps)
    objects_us = _median_us(lambda: pickle.loads(pickle.dumps(outputs, pickle.HIGHEST_PROTOCOL)), args.steps // 10)

    ctx = multiprocessing.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_sender, args=(send_end, args.streams, args.prompt_len, args.steps))
    child.start()
    send_end.close()
    recv_us = []
    while True:
        t0 = time.thread_time()
        try:
            message = recv_end.recv()
        except EOFError:
            break
        [decode_output(r, None, []) for r in message.outputs]
        recv_us.append((time.thread_time() - t0) * 1e6)
    child.join()
    print(f"{args.streams} streams, one token each, {len(data)} bytes per step")
    print(f"engine process, encode + pickle:          {send_us:7.0f} us per step")
    print(f"server process, recv + unpickle + decode: {statistics.median(recv_us):7.0f} us per step "
          f"({len(recv_us)} steps)")
    print(f"(RequestOutput objects with prompts, pickle + unpickle: {objects_us:.0f} us)")


if __name__ == "__main__":
    main()
