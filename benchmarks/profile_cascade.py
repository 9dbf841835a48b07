"""Where the time of a shared-prefix decode step goes: cascade attention vs prefix caching alone (#24).

`bench prefix` (a) measured 3.45 ms per decode step with caching + cascade and 3.69 ms with
caching alone (H200, 1c012ed), while the cascade step's bytes (weights 1.19 GB, the shared
prefix once per tile of 32 requests, twice per layer: 0.47 GB, suffixes 0.95 GB, split
partials 0.27 GB: ~2.9 GB, 0.69 ms at 4.2 TB/s; docs/memory.md) put its device time near
1 ms. This profile tells the two readings apart:

- device-bound: the GPU time per step (the engine's StepTimeline, CUDA events around each
  step's device work) is about the wall time, the GPU idles little before each step, and
  the kernel table says which kernel takes it;
- host-bound: the GPU idles before each step, and the host phases (StepTimer: schedule,
  input preparation incl. the cascade plan, update + outputs) add up to about the wall time.
  With async scheduling the host prepares step N+1 while the GPU runs step N, so a step
  takes max(host, device).

Same workload as `bench prefix` (a): one request carries the --prefix-len system prompt, then
--num-requests requests of prefix + --unique-len own tokens; after their prefill and
WARM_STEPS decode steps, --steps decode steps with the step timer and timeline (no profiler:
its overhead alone could make a step host-bound), then --steps more under torch.profiler for
the kernels (CUDA graphs on, as served). Then (b), the same two passes over requests whose
prefix is cached, from add_request to their first token, on an engine like `bench prefix`
(b)'s (chunked prefill cap 128, mixed graphs). --no-pdl: kernel durations without the wait
at the programmatic-dependent-launch barrier (with PDL a kernel starts early and waits).

    python benchmarks/profile_cascade.py --model benchmarks/configs/qwen3-0.6b      # H200: ~1-2 min
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
    steps: int  # units (engine steps, or requests for (b)) per pass
    wall_ms: float  # per unit, profiler off
    host_ms: dict  # StepTimer phase -> ms per engine step, profiler off
    gpu_ms_timeline: float  # per unit: GPU time between each step's CUDA events (StepTimeline), profiler off
    gap_ms_timeline: float  # per unit: GPU idle before the steps (the host was late), profiler off
    profiled_wall_ms: float  # per unit, profiler on
    kernels: list  # [KernelStat] over the profiled pass
    cascade_steps: int  # steps of the plain pass that had a cascade plan
    graph_replays: dict  # kind -> replays in the plain pass

    @property
    def kernel_ms(self) -> float:
        """Kernel time per unit in the profiled pass (with PDL on, a kernel's wait at its barrier counts)."""
        return sum(k.device_us for k in self.kernels) / max(1, self.steps) / 1e3


def _tokens(rng: random.Random, n: int, high: int) -> list[int]:
    return [rng.randint(1, high) for _ in range(n)]


def _counters(llm) -> tuple[int, dict]:
    runner = llm.engine.executor.worker.runner
    graphs = runner.cuda_graphs
    return runner.num_cascade_steps, dict(graphs.num_replays) if graphs is not None else {}


def _measured(llm, label: str, units: int, body) -> StepProfile:
    """Two passes of `body(pass_index)` (each `units` engine steps, or requests): a plain one with
    the engine's StepTimer and StepTimeline (no profiler: its overhead would make any step
    host-bound), then one under torch.profiler for the kernels."""
    engine = llm.engine
    runner = engine.executor.worker.runner
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer, timeline = engine.step_timer, runner.timeline
    timer.totals, timer.steps = dict.fromkeys(timer.PHASES, 0.0), 0
    timeline.reset()
    c0, r0 = _counters(llm)
    sync()
    t0 = time.perf_counter()
    body(0)
    sync()
    wall = (time.perf_counter() - t0) / units
    c1, r1 = _counters(llm)
    host = {k: round(1e3 * v / max(1, timer.steps), 3) for k, v in timer.totals.items()}
    records = list(timeline.records)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        body(1)
        sync()
        profiled_wall = (time.perf_counter() - t0) / units
    kernels = [KernelStat(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return StepProfile(label, units, wall * 1e3, host, sum(r.gpu_ms for r in records) / units,
                       sum(r.gap_ms for r in records) / units, profiled_wall * 1e3, kernels, c1 - c0,
                       {k: r1[k] - r0.get(k, 0) for k in r1})


def profile_shared_decode(model: str, mode: str, num_requests: int, prefix_len: int, unique_len: int,
                          steps: int, device: str = "auto", dtype: str = "auto", pdl: bool = True) -> StepProfile:
    """`steps` decode steps of bench prefix (a)'s batch (twice: plain, profiled) on an engine with
    prefix caching and cascade_attention=`mode`."""
    output_len = WARM_STEPS + 2 * steps + 8
    llm = workload_llm(model, prefix_len + unique_len + output_len + 16, num_requests, device=device, dtype=dtype,
                       enable_prefix_caching=True, cascade_attention=mode, step_timing=True, step_timeline=True,
                       pdl=pdl)
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

        def body(_):
            for _ in range(steps):
                engine.step()

        prof = _measured(llm, f"(a) cascade_attention={mode}", steps, body)
        engine.abort_request(ids)
        drive(engine)
        return prof
    finally:
        release(llm)


def profile_cached_first_step(model: str, prefix_len: int, unique_len: int, repeats: int, device: str = "auto",
                              dtype: str = "auto", mode: str = "auto", pdl: bool = True) -> StepProfile:
    """bench prefix (b): add a request whose prefix is cached and step until its first token,
    `repeats` times per pass, on an engine like bench prefix (b)'s."""
    max_len = max(TTFT_MODEL_LEN, prefix_len + unique_len + 16)
    llm = workload_llm(model, max_len, TTFT_MAX_NUM_SEQS, device=device, dtype=dtype, enable_prefix_caching=True,
                       cascade_attention=mode, max_prefill_tokens_while_decoding=TTFT_PREFILL_CAP, step_timing=True,
                       step_timeline=True, pdl=pdl)
    try:
        engine = llm.engine
        high = min(TOKEN_ID_MAX, engine.hf_config.vocab_size - 1)
        rng = random.Random(3)
        one = SamplingParams(temperature=0, max_tokens=1)
        prompts = []
        for rep in range(2 * repeats + 1):  # a request caches each prefix; the first pair warms up
            prefix = _tokens(rng, prefix_len, high)
            engine.add_request(f"cache-{rep}", {"prompt_token_ids": prefix + _tokens(rng, unique_len, high)}, one)
            drive(engine)
            prompts.append(prefix + _tokens(rng, unique_len, high))
        engine.add_request("cached-warm", {"prompt_token_ids": prompts[-1]}, one)
        drive(engine)

        def body(p):
            for rep in range(repeats):
                engine.add_request(f"cached-{p}-{rep}", {"prompt_token_ids": prompts[p * repeats + rep]}, one)
                while engine.has_unfinished_requests():
                    engine.step()

        # per request: add_request to its first token (two engine steps with async scheduling)
        return _measured(llm, "(b) a cached-prefix request, add to first token", repeats, body)
    finally:
        release(llm)


def report(prof: StepProfile, top: int = 12, per: str = "step") -> str:
    host = sum(v for k, v in prof.host_ms.items() if k != "resolve")  # resolve holds the GPU wait
    lines = [f"{prof.label}: wall {prof.wall_ms:.3f} ms/{per}; GPU per step events {prof.gpu_ms_timeline:.3f} ms/{per}, "
             f"GPU idle before steps {prof.gap_ms_timeline:.3f} ms/{per} (large: host-bound); cascade steps "
             f"{prof.cascade_steps}, graph replays {prof.graph_replays}",
             "  host phases per engine step: " + ", ".join(f"{k} {v:.3f} ms" for k, v in prof.host_ms.items())
             + f"; without resolve (the GPU wait): {host:.3f} ms",
             f"  under the profiler: wall {prof.profiled_wall_ms:.3f} ms/{per}, kernels {prof.kernel_ms:.3f} ms/{per}",
             f"  {'kernel':<72} {'ms/' + per:>10} {'calls/' + per:>13}"]
    for k in sorted(prof.kernels, key=lambda k: -k.device_us)[:top]:
        lines.append(f"  {k.name[:72]:<72} {k.device_us / prof.steps / 1e3:10.3f} {k.count / prof.steps:13.1f}")
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
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch without programmatic dependent launch: kernel times without the wait at the barrier")
    ap.add_argument("--parts", default="a,b")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b"}:
        raise SystemExit(f"--parts takes a comma-separated subset of a,b, got {args.parts!r}")
    if "a" in parts:
        for mode in (args.cascade_mode, OFF):
            prof = profile_shared_decode(args.model, mode, args.num_requests, args.prefix_len, args.unique_len,
                                         args.steps, args.device, args.dtype, pdl=not args.no_pdl)
            print(report(prof), flush=True)
    if "b" in parts:
        prof = profile_cached_first_step(args.model, args.prefix_len, args.unique_len, args.ttft_repeats,
                                         args.device, args.dtype, args.cascade_mode, pdl=not args.no_pdl)
        print(report(prof, per="request"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
