"""Where the time of a shared-prefix decode step goes: cascade attention vs prefix caching alone (#24).

`bench prefix` (a) measured 3.45 ms per decode step with caching + cascade and 3.69 ms with
caching alone (H200, 1c012ed), while the cascade step's bytes (weights 1.19 GB, the shared
prefix once per tile of 32 requests, twice per layer: 0.47 GB, suffixes 0.95 GB, split
partials 0.27 GB: ~2.9 GB, 0.69 ms at 4.2 TB/s; docs/memory.md) put its device time near
1 ms. This profile tells the two readings apart:

- device-bound: GPU busy per step ~ wall per step, and the kernel table says which kernel;
- host-bound: GPU busy well under the wall time, and the host phases (StepTimer: schedule,
  input preparation incl. the cascade plan, update + detokenization + outputs) add up to
  the wall time. With async scheduling the host prepares step N+1 while the GPU runs step
  N, so a step takes max(host, device).

Same workload as `bench prefix` (a): one request carries the --prefix-len system prompt, then
--num-requests requests of prefix + --unique-len own tokens; after their prefill and
WARM_STEPS decode steps, torch.profiler over --steps decode steps (CUDA graphs on, as
served). Then (b): the first step of one more request whose prefix is cached, profiled the
same way, on an engine like `bench prefix` (b)'s (chunked prefill, mixed graphs).

    python benchmarks/profile_cascade.py --model benchmarks/configs/qwen3-0.6b      # H200: ~1 min
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from profile_decode import KernelStat  # noqa: E402

from nanovllm import RequestOutputKind, SamplingParams  # noqa: E402
from nanovllm.bench.engines import drive, release, workload_llm  # noqa: E402

WARM_STEPS = 4  # decode steps after the prefill, before profiling (graphs replayed, caches warm)
TOKEN_ID_MAX = 10000
# bench prefix (b) runs on its (c) engine: --prefill-cap 128 (mixed graphs), 32 decodes + 1, 4,000-token prompts
TTFT_PREFILL_CAP = 128
TTFT_MAX_NUM_SEQS = 33
TTFT_MODEL_LEN = 4016
OFF = "off"  # the (a) peer: prefix caching alone


@dataclass(frozen=True)
class StepProfile:
    label: str
    steps: int
    wall_ms: float  # per step, with the profiler on
    host_ms: dict  # StepTimer phase -> ms per step
    kernels: list  # [KernelStat] over all profiled steps
    cascade_steps: int  # steps of the profiled window that had a cascade plan
    graph_replays: dict  # kind -> replays in the profiled window

    @property
    def gpu_ms(self) -> float:
        """GPU busy time per step (kernel time; overlapping kernels counted twice)."""
        return sum(k.device_us for k in self.kernels) / max(1, self.steps) / 1e3


def _tokens(rng: random.Random, n: int, high: int) -> list[int]:
    return [rng.randint(1, high) for _ in range(n)]


def _counters(llm) -> tuple[int, dict]:
    runner = llm.engine.executor.worker.runner
    graphs = runner.cuda_graphs
    return runner.num_cascade_steps, dict(graphs.num_replays) if graphs is not None else {}


def _profiled(llm, label: str, steps: int, body) -> StepProfile:
    """torch.profiler (+ the engine's StepTimer, reset) around `body()`, which runs `steps` engine steps."""
    engine = llm.engine
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = engine.step_timer
    if timer is not None:
        timer.totals = dict.fromkeys(timer.PHASES, 0.0)
        timer.steps = 0
    c0, r0 = _counters(llm)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        body()
        sync()
        wall = (time.perf_counter() - t0) / steps
    c1, r1 = _counters(llm)
    host = {k: round(1e3 * v / max(1, timer.steps), 3) for k, v in timer.totals.items()} if timer else {}
    kernels = [KernelStat(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return StepProfile(label, steps, wall * 1e3, host, kernels, c1 - c0, {k: r1[k] - r0.get(k, 0) for k in r1})


def profile_shared_decode(model: str, mode: str, num_requests: int, prefix_len: int, unique_len: int,
                          steps: int, device: str = "auto", dtype: str = "auto") -> StepProfile:
    """`steps` decode steps of bench prefix (a)'s batch on an engine with prefix caching and
    cascade_attention=`mode`."""
    output_len = WARM_STEPS + steps + 8
    llm = workload_llm(model, prefix_len + unique_len + output_len + 16, num_requests, device=device, dtype=dtype,
                       enable_prefix_caching=True, cascade_attention=mode, step_timing=True)
    try:
        engine = llm.engine
        high = min(TOKEN_ID_MAX, engine.hf_config.vocab_size - 1)
        rng = random.Random(2)
        prefix = _tokens(rng, prefix_len, high)
        engine.add_request("system", {"prompt_token_ids": prefix}, SamplingParams(temperature=0, max_tokens=1))
        drive(engine)  # the system prompt is cached
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        ids = [f"shared-{i}" for i in range(num_requests)]
        for rid in ids:
            engine.add_request(rid, {"prompt_token_ids": prefix + _tokens(rng, unique_len, high)}, params)
        while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
            engine.step()
        for _ in range(WARM_STEPS):
            engine.step()

        def body():
            for _ in range(steps):
                engine.step()

        prof = _profiled(llm, f"(a) cascade_attention={mode}", steps, body)
        engine.abort_request(ids)
        drive(engine)
        return prof
    finally:
        release(llm)


def profile_cached_first_step(model: str, prefix_len: int, unique_len: int, repeats: int, device: str = "auto",
                              dtype: str = "auto", mode: str = "auto") -> StepProfile:
    """bench prefix (b): add a request whose prefix is cached and step until its first token,
    `repeats` times (each after an untimed request that caches its prefix)."""
    max_len = max(TTFT_MODEL_LEN, prefix_len + unique_len + 16)
    llm = workload_llm(model, max_len, TTFT_MAX_NUM_SEQS, device=device, dtype=dtype, enable_prefix_caching=True,
                       cascade_attention=mode, max_prefill_tokens_while_decoding=TTFT_PREFILL_CAP, step_timing=True)
    try:
        engine = llm.engine
        high = min(TOKEN_ID_MAX, engine.hf_config.vocab_size - 1)
        rng = random.Random(3)
        one = SamplingParams(temperature=0, max_tokens=1)
        prompts = []
        for rep in range(repeats + 1):  # the first pair warms up (graphs, Triton)
            prefix = _tokens(rng, prefix_len, high)
            engine.add_request(f"cache-{rep}", {"prompt_token_ids": prefix + _tokens(rng, unique_len, high)}, one)
            drive(engine)
            prompts.append(prefix + _tokens(rng, unique_len, high))
        engine.add_request("cached-warm", {"prompt_token_ids": prompts[0]}, one)
        drive(engine)

        def body():
            for rep in range(1, repeats + 1):
                engine.add_request(f"cached-{rep}", {"prompt_token_ids": prompts[rep]}, one)
                while engine.has_unfinished_requests():
                    engine.step()

        # per request: add_request to its first token (two engine steps with async scheduling)
        return _profiled(llm, "(b) a cached-prefix request, add to first token", repeats, body)
    finally:
        release(llm)


def report(prof: StepProfile, top: int = 12, per: str = "step") -> str:
    busy = prof.gpu_ms / max(prof.wall_ms, 1e-9)
    lines = [f"{prof.label}: wall {prof.wall_ms:.3f} ms/{per}, GPU busy {prof.gpu_ms:.3f} ms/{per} ({busy:.0%} of the "
             f"wall; well below 100%: host-bound); cascade steps {prof.cascade_steps}, graph replays "
             f"{prof.graph_replays}"]
    if prof.host_ms:
        total = sum(v for k, v in prof.host_ms.items() if k != "forward_sample_sync")
        lines.append("  host phases per engine step: " + ", ".join(f"{k} {v:.3f} ms" for k, v in prof.host_ms.items())
                     + f"; host work without the forward/wait: {total:.3f} ms")
    lines.append(f"  {'kernel':<72} {'ms/' + per:>9} {'calls/' + per:>10}")
    for k in sorted(prof.kernels, key=lambda k: -k.device_us)[:top]:
        lines.append(f"  {k.name[:72]:<72} {k.device_us / prof.steps / 1e3:9.3f} {k.count / prof.steps:10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--unique-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="profiled decode steps per engine (default 20)")
    ap.add_argument("--ttft-repeats", type=int, default=5, help="(b) profiled cached-prefix requests (default 5)")
    ap.add_argument("--cascade-mode", choices=("auto", "force"), default="auto",
                    help="cascade_attention of the cascade engine (force: tiny CPU runs below the auto thresholds)")
    ap.add_argument("--parts", default="a,b")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b"}:
        raise SystemExit(f"--parts takes a comma-separated subset of a,b, got {args.parts!r}")
    if "a" in parts:
        for mode in (args.cascade_mode, OFF):
            prof = profile_shared_decode(args.model, mode, args.num_requests, args.prefix_len, args.unique_len,
                                         args.steps, args.device, args.dtype)
            print(report(prof), flush=True)
    if "b" in parts:
        prof = profile_cached_first_step(args.model, args.prefix_len, args.unique_len, args.ttft_repeats,
                                         args.device, args.dtype, args.cascade_mode)
        print(report(prof, per="request"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
