"""Host time of one engine decode step, per phase, with the model's device work taken out.

With async scheduling the host builds step N+1 while the GPU runs step N, so a step takes
max(host, device): once the host's per-step work (scheduling, KV block bookkeeping, the
StepInput, the worker's input arrays, sampling parameters, reading the results, detokenizing,
stop checks, RequestOutputs) exceeds the GPU's step, the engine is host-bound. This runs the
real LLMEngine and the real in-process worker, on the CPU, on a one-layer random model of the
bundled tokenizer's vocabulary, and reads the engine's StepTimer (engine/step_timer.py): every
phase but `forward` and `sample` (the model and the sampler, device work on a GPU) is host
work the GPU step has to hide.

Each batch size: B requests with random prompts of --context tokens, stepped until all of
them decode, a few warm-up steps, then --repeats windows of --steps decode steps (medians of
the windows). Phases are timed in this thread's CPU time (`time.thread_time`), so other
processes on a shared machine do not inflate them; torch runs on one thread. Modes:

    offline    no tokenizer, FINAL_ONLY outputs: what `nanovllm bench throughput` runs
    tokenizer  the tokenizer on (incremental detokenization), FINAL_ONLY (LLM.generate)
    stream     the tokenizer on, DELTA outputs every step (what a streaming server asks for)

    python benchmarks/host_step_cost.py                       # all modes, batch 1..256, CSV + PNG
    python benchmarks/host_step_cost.py --modes offline --batch-sizes 64 --profile 64   # + cProfile

Rows: benchmarks/results/host_step_cost.csv (date, device, commit); plot host_step_cost.png.
The CPU is usually slower than a GPU server's host: read the numbers as an upper bound of the
host's share, and confirm on the GPU machine with NANOVLLM_STEP_TIMING=1 (docs/performance.md).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.bench.report import RESULTS_DIR, append_rows, base_row  # noqa: E402
from nanovllm.engine.step_timer import HOST_PHASES, StepTimer  # noqa: E402
from nanovllm.loading.resolve import bundled_model_path  # noqa: E402
from nanovllm.sampling_params import RequestOutputKind  # noqa: E402

MODES = {  # name -> (tokenizer on, output kind)
    "offline": (False, RequestOutputKind.FINAL_ONLY),
    "tokenizer": (True, RequestOutputKind.FINAL_ONLY),
    "stream": (True, RequestOutputKind.DELTA),
}
DEVICE_PHASES = ("forward", "sample")  # the model and the sampler: device work on a GPU
WARMUP_STEPS = 4
TEMPERATURE = 0.6  # the throughput workload's


def build_model_dir(path: str, tokenizer_dir: str | None = None) -> str:
    """A one-layer random Qwen3 (the GPU benchmark's architecture) with a real tokenizer and its
    vocabulary (the bundled model's, or an HF tokenizer directory), saved as an HF directory: its
    forward is cheap, its host path real."""
    import torch
    import transformers

    from nanovllm.loading.gguf_loader import load_gguf_tokenizer

    if tokenizer_dir is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = load_gguf_tokenizer(bundled_model_path())
    config = transformers.Qwen3Config(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      vocab_size=len(tokenizer), tie_word_embeddings=True,
                                      max_position_embeddings=4096, rms_norm_eps=1e-6,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_engine(model_dir: str, tokenizer: bool, max_batch: int, max_len: int) -> LLM:
    block_size = 16
    blocks = max_batch * (-(-max_len // block_size) + 1) + 64
    return LLM(model_dir, device="cpu", dtype="float32", skip_tokenizer_init=not tokenizer, async_scheduling=True,
               step_timing=True, max_model_len=max_len, max_num_seqs=max_batch, max_num_batched_tokens=16384,
               num_kv_blocks=blocks, block_size=block_size)


class GCTimer:
    """Seconds spent in Python's cyclic garbage collector (inside whichever phase it interrupts)."""

    def __init__(self) -> None:
        self.total, self.collections, self._start = 0.0, 0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.thread_time()
        else:
            self.total += time.thread_time() - self._start
            self.collections += 1

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def measure(llm: LLM, batch: int, context: int, steps: int, repeats: int, kind: RequestOutputKind, vocab: int,
            seed: int, profile: bool = False) -> tuple[list[dict[str, float]], str]:
    """Per-window seconds per step of each phase (the engine's StepTimer, plus "gc": the time in
    the garbage collector, already inside the phases), and a cProfile report of the timed
    windows when `profile`."""
    engine = llm.engine
    timer: StepTimer = engine.step_timer
    timer.clock = time.thread_time  # CPU time of this thread: immune to other processes on a shared machine
    rng = random.Random(seed)
    # max_tokens=None: up to max_model_len, past every timed step (the requests are aborted after)
    params = SamplingParams(temperature=TEMPERATURE, max_tokens=None, ignore_eos=True, output_kind=kind)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]}, params)
    decoding = 0
    while decoding < WARMUP_STEPS:  # prefill, then a few steps with every request decoding
        engine.step()
        tokens, prefill, seqs = engine.last_step_tokens
        decoding = decoding + 1 if prefill == 0 and seqs == batch else 0
    windows, report = [], ""
    prof = cProfile.Profile() if profile else None
    for _ in range(repeats):
        timer.reset()
        gc_timer = GCTimer()
        if prof:
            prof.enable()
        for _ in range(steps):
            engine.step()
        if prof:
            prof.disable()
        gc_timer.close()
        if timer.steps != steps or engine.last_step_tokens[2] != batch:
            raise RuntimeError(f"expected {steps} decode steps of {batch} requests, got {timer.steps} steps "
                               f"(last of {engine.last_step_tokens[2]})")
        windows.append({**timer.per_step(), "gc": gc_timer.total / steps})
    engine.abort_request(ids)
    engine.step()  # the aborted requests' state leaves the worker
    if prof:
        out = io.StringIO()
        # Python functions of the engine and the worker (the host path), not the torch ops they call
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(r"nanovllm|numpy|builtins|method", 40)
        report = out.getvalue()
    return windows, report


def row_of(windows: list[dict[str, float]], mode: str, batch: int, context: int, steps: int) -> dict:
    med = {k: statistics.median(w[k] for w in windows) for k in StepTimer.PHASES}
    host = statistics.median(sum(w[k] for k in HOST_PHASES) for w in windows)
    row = {**base_row(), "mode": mode, "batch": batch, "context": context, "steps": steps,
           "repeats": len(windows), "host_us_per_step": round(1e6 * host, 1),
           "host_us_per_seq": round(1e6 * host / batch, 2),
           "device_phases_us_per_step": round(1e6 * sum(med[k] for k in DEVICE_PHASES), 1),
           "gc_us_per_step": round(1e6 * statistics.median(w["gc"] for w in windows), 1)}
    row.update({f"{k}_us": round(1e6 * med[k], 1) for k in StepTimer.PHASES})
    return row


def plot(path: str, rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.0), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10").colors
    for ax, mode in zip(axes[0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        labels = [str(r["batch"]) for r in mine]
        bottom = [0.0] * len(mine)
        for c, phase in enumerate(HOST_PHASES):
            vals = [float(r[f"{phase}_us"]) / 1e3 for r in mine]
            ax.bar(labels, vals, bottom=bottom, label=phase, color=colors[c % len(colors)])
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, (b, r) in enumerate(zip(bottom, mine)):
            ax.annotate(f"{float(r['host_us_per_seq']):.1f} us/seq", (x, b), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{mode}", fontsize=10)
        ax.set_xlabel("batch (decode requests)")
    axes[0][0].set_ylabel("host ms per decode step")
    axes[0][0].legend(fontsize=7, loc="upper left")
    r0 = rows[0]
    fig.suptitle(f"Host time of a decode step by phase (labels: per sequence), {r0['device']}, {r0['commit']}, "
                 f"{r0['date']}, context {r0['context']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16,64,128,256")
    ap.add_argument("--context", type=int, default=600, help="prompt tokens of every request")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timed window")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows per batch size (medians)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the host path is one Python thread)")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="an HF tokenizer directory (default: the bundled SmolLM2's, from its GGUF)")
    ap.add_argument("--profile", type=int, default=None, metavar="B", help="cProfile the timed steps of batch B")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "host_step_cost.csv"), help="'' = no CSV / plot")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}: choose from {list(MODES)}")
    max_len = args.context + WARMUP_STEPS + args.steps * args.repeats + 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(tmp, args.tokenizer)
        vocab = None
        for mode in modes:
            tokenizer, kind = MODES[mode]
            llm = make_engine(model_dir, tokenizer, max(batches), max_len)
            vocab = llm.engine.hf_config.vocab_size
            for batch in batches:
                t0 = time.perf_counter()
                windows, report = measure(llm, batch, args.context, args.steps, args.repeats, kind, vocab,
                                          seed=batch, profile=args.profile == batch)
                row = row_of(windows, mode, batch, args.context, args.steps)
                rows.append(row)
                phases = ", ".join(f"{k} {row[f'{k}_us']:.0f}" for k in HOST_PHASES)
                print(f"{mode:9s} batch {batch:4d}: host {row['host_us_per_step'] / 1e3:7.3f} ms/step "
                      f"{row['host_us_per_seq']:7.2f} us/seq | {phases} us | device phases "
                      f"{row['device_phases_us_per_step'] / 1e3:.2f} ms, of the host time in gc "
                      f"{row['gc_us_per_step']:.0f} us ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                if report:
                    print(report)
            llm.engine.shutdown()
    if args.out:
        path = append_rows(args.out, rows)
        print("rows ->", path, "| plot ->", plot(os.path.splitext(path)[0] + ".png", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
