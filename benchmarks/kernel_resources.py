"""Registers and spills of the decode-path Triton kernels, compiled for Hopper on any machine.

    python benchmarks/kernel_resources.py                  # every kernel, Qwen3-0.6B and -8B shapes
    python benchmarks/kernel_resources.py --only decode     # one kernel family (decode, rope, gemv)
    python benchmarks/kernel_resources.py --json            # one JSON object per line

Why. GPU time is scarce; register pressure is not. Triton compiles for a target without a
GPU present, and ptxas (bundled with Triton) does the register allocation, so the number
of registers per thread and the bytes spilled to local memory can be read on the CPU
machine. Registers per thread bound how many programs share an SM (occupancy, which hides
memory latency), and a kernel that spills pays a local-memory round trip per spilled value.
The backed-out RoPE-in-attention fusion (docs/performance.md) took the decode kernel from
94-138 to 239-255 registers per thread, two programs per SM instead of four or five; this
is where such a change shows before a device run.

How. Each kernel's own host launcher runs on small CPU tensors with the kernel object
swapped for a recorder, so the launch arguments, constexprs and launch options are exactly
those the engine would pass for that shape; the recorded launch is then compiled with
`triton.compile` for sm_90 with PDL on (as on an H100 / H200). Pointer arguments are assumed
16-byte aligned and integers divisible by 16 specialised as Triton would at run time.
Numbers come from the installed Triton (the device image may carry another version).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not the interpreter's stand-ins

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nanovllm.kernels import gemv, paged_attention, quant_formats, quant_gemm, quant_gemv, rope_kv_store  # noqa: E402
from nanovllm.kernels.launch_math import next_pow2  # noqa: E402

HOPPER_CAPABILITY = 90
WARP_SIZE = 32
DIVISIBILITY = 16  # Triton's pointer / integer specialisation
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                 torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8",
                 torch.float8_e4m3fn: "*fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")

# Model shapes: (name, query heads, KV heads, head_dim, hidden, intermediate), from benchmarks/configs.
MODELS = (("qwen3-0.6b", 16, 8, 128, 1024, 3072), ("qwen3-8b", 32, 8, 128, 4096, 12288))
DECODE_BATCHES = (1, 256)  # batch 1: several KV splits and the merge; 256: one split (direct output)
DECODE_CONTEXT = 1024
BLOCK_SIZE = 16


@contextlib.contextmanager
def recording(module, name: str):
    """Swap `module.name` (a @triton.jit kernel) for a recorder of its launches."""
    kernel, launches = getattr(module, name), []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args, kwargs))

    setattr(module, name, Recorder())
    try:
        yield kernel, launches
    finally:
        setattr(module, name, kernel)


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself would run for this target (it bundles more than one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(capability).path
    except TypeError:  # older Triton: no target argument
        return get_ptxas().path


def compile_launch(kernel, args, kwargs, capability: int = HOPPER_CAPABILITY) -> dict:
    """Compile one recorded launch for `capability`; ptxas's registers and spill bytes."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip([p.name for p in kernel.params], args), **kwargs)
    if "USE_PDL" in values:  # the CPU launcher turned PDL off; the GPU would launch with it
        values["USE_PDL"], options["launch_pdl"] = True, True
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
        elif torch.is_tensor(v):
            signature[p.name], attrs[(i,)] = POINTER_TYPES[v.dtype], [["tt.divisibility", DIVISIBILITY]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:  # Triton turns 1 into a constant
                signature[p.name], constexprs[(i,)] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % DIVISIBILITY == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", DIVISIBILITY]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {p.name} of type {type(v).__name__} not handled")
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", capability, WARP_SIZE), options=options)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch = f"sm_{capability}a" if capability == HOPPER_CAPABILITY else f"sm_{capability}"
        # ptxas again, on the same PTX: only its -v log states the spill bytes (Triton keeps the cubin, not the log)
        proc = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(d, "kernel.o")],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptxas failed: {proc.stderr.strip()}")
        log = proc.stdout + proc.stderr
    regs, spills = PTXAS_REGISTERS.search(log), PTXAS_SPILLS.search(log)
    return {"registers": int(regs.group(1)), "stack_bytes": int(spills.group(1)),
            "spill_store_bytes": int(spills.group(2)), "spill_load_bytes": int(spills.group(3)),
            "num_warps": options.get("num_warps", 4), "num_stages": options.get("num_stages", 3)}


def _decode_cases():
    for model, heads, kv_heads, head_dim, _, _ in MODELS:
        for batch in DECODE_BATCHES:
            blocks = batch * DECODE_CONTEXT // BLOCK_SIZE
            q = torch.zeros(batch, heads, head_dim, dtype=torch.bfloat16)
            cache = torch.zeros(blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=torch.bfloat16)
            lens = torch.full((batch,), DECODE_CONTEXT, dtype=torch.int32)
            tables = torch.arange(blocks, dtype=torch.int32).view(batch, -1)
            splits = paged_attention.choose_num_splits(batch, kv_heads, DECODE_CONTEXT, torch.device("cpu"))
            with recording(paged_attention, "_decode_split_kernel") as (kernel, launches):
                paged_attention.paged_attention_decode(q, cache, cache, lens, tables, head_dim**-0.5,
                                                       max_seq_len=DECODE_CONTEXT)
            yield f"decode attention {model} batch {batch} ({splits} splits)", kernel, launches[0]


def _rope_cases():
    for model, heads, kv_heads, head_dim, _, _ in MODELS:
        qkv = torch.zeros(1, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16)
        q = qkv[:, : heads * head_dim].view(1, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(1, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim :].view(1, kv_heads, head_dim)
        cache = torch.zeros(4, kv_heads, BLOCK_SIZE, head_dim, dtype=torch.bfloat16)
        norm = torch.ones(head_dim, dtype=torch.bfloat16)
        with recording(rope_kv_store, "_rope_store_kernel") as (kernel, launches):
            rope_kv_store.rope_and_store_kv(q, k, v, torch.zeros(1, dtype=torch.int64),
                                            torch.zeros(64, head_dim), cache, cache,
                                            torch.zeros(1, dtype=torch.int64), norm, norm)
        yield f"rope + q/k norm + store {model} batch 1", kernel, launches[0]


def _gemv_cases():
    for model, heads, kv_heads, head_dim, hidden, inter in MODELS:
        qkv_rows = (heads + 2 * kv_heads) * head_dim
        shapes = (("qkv (norm prologue)", qkv_rows, hidden, gemv.PROLOGUE_RMS_NORM),
                  ("down (silu prologue)", hidden, inter, gemv.PROLOGUE_SILU_MUL))
        for label, n, k, prologue in shapes:
            w = torch.zeros(n, k, dtype=torch.bfloat16)
            for m in (1, gemv.GEMV_MAX_M):
                for config in gemv.CONFIGS:
                    with recording(gemv, "_skinny_gemm_kernel") as (kernel, launches):
                        if prologue == gemv.PROLOGUE_RMS_NORM:
                            x = torch.zeros(m, k, dtype=torch.bfloat16)
                            gemv.rms_norm_skinny_gemm(x, x, torch.ones(k, dtype=torch.bfloat16), 1e-6, w,
                                                      config=config)
                        else:
                            gemv.silu_mul_skinny_gemm(torch.zeros(m, 2 * k, dtype=torch.bfloat16), w, config=config)
                    yield (f"skinny gemm {model} {label} {n}x{k} M={m} block_n {config.block_n} block_k "
                           f"{config.block_k}"), kernel, launches[0]


def _quant_cases():
    """Quantized skinny GEMM (M = 1 and 8, every config) and tensor-core GEMM (M = 16 and 128),
    int4 / int8 / fp8, the Qwen3-8B down projection (silu prologue) and qkv (norm prologue)."""
    _, heads, kv_heads, head_dim, hidden, inter = MODELS[-1]
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    for qtype in quant_formats.QTYPES:
        for label, n, k, prologue in (("qkv (norm prologue)", qkv_rows, hidden, quant_gemv.PROLOGUE_RMS_NORM),
                                      ("down (silu prologue)", hidden, inter, quant_gemv.PROLOGUE_SILU_MUL)):
            qw = quant_formats.quantize(torch.zeros(n, k), qtype)
            kernel_name = "_fp8_kernel" if qtype == "fp8" else "_words_kernel"
            for m in (1, quant_gemv.QGEMV_MAX_M):
                x = torch.zeros(m, 2 * k, dtype=torch.bfloat16)
                for config in quant_gemv.CONFIGS:
                    if not quant_gemv._fits(next_pow2(m), config.block_n, config.block_v, config.num_warps,
                                            8 if qtype == "fp8" else 4):
                        continue
                    with recording(quant_gemv, kernel_name) as (kernel, launches):
                        if prologue == quant_gemv.PROLOGUE_RMS_NORM:
                            quant_gemv.quant_rms_norm_skinny_gemm(x[:, :k], x[:, k:], torch.ones(k, dtype=torch.bfloat16),
                                                                  1e-6, qw, config=config)
                        else:
                            quant_gemv.quant_silu_mul_skinny_gemm(x, qw, config=config)
                    yield (f"quant skinny {qtype} {label} {n}x{k} M={m} block_n {config.block_n} block_v "
                           f"{config.block_v}"), kernel, launches[0]
            for m in (16, 128):
                x = torch.zeros(m, k, dtype=torch.bfloat16)
                for config in quant_gemm.CONFIGS:
                    if config.block_m > max(16, m):
                        continue
                    with recording(quant_gemm, "_dot_kernel") as (kernel, launches):
                        quant_gemm.quant_dot_gemm(x, qw, config=config)
                    yield (f"quant dot {qtype} {n}x{k} M={m} block_n {config.block_n} block_m {config.block_m} "
                           f"block_w {config.block_w}"), kernel, launches[0]


CASES = {"decode": _decode_cases, "rope": _rope_cases, "gemv": _gemv_cases, "quant": _quant_cases}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=sorted(CASES), action="append", help="kernel family (repeatable)")
    p.add_argument("--capability", type=int, default=HOPPER_CAPABILITY, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = p.parse_args(argv)
    if not args.json:
        print(f"triton {triton.__version__}, sm_{args.capability}; registers per thread (255 = the limit), "
              "stack and spill bytes per thread")
    for family in args.only or list(CASES):
        for name, kernel, (launch_args, launch_kwargs) in CASES[family]():
            r = compile_launch(kernel, launch_args, launch_kwargs, args.capability)
            if args.json:
                print(json.dumps({"kernel": name, **r}))
            else:
                print(f"{name:70s} {r['num_warps']} warps: {r['registers']:3d} regs, stack {r['stack_bytes']:4d} B, "
                      f"spill stores {r['spill_store_bytes']:4d} B, loads {r['spill_load_bytes']:4d} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
