"""benchmarks/profile_summary.py (and profile_decode.py's step profiler) on the CPU."""

import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import profile_summary as ps  # noqa: E402
from profile_decode import KernelStat  # noqa: E402

# Names as torch.profiler reports them on an H100 / H200 (benchmarks/results/profile_decode_h100*.txt)
PROFILED_NAMES = {
    "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT": "gemv/gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16,": "gemv/gemm",
    "_skinny_gemm_kernel": "gemv/gemm",
    "_decode_split_kernel": "attention",
    "_decode_reduce_kernel": "attention",
    "_rms_norm_kernel": "norm",
    "_rope_store_kernel": "rope",
    "_silu_and_mul_kernel": "activation",
    "_sample_chunk_kernel": "sampling",
    "Memcpy HtoD (Pinned -> Device)": ps.OTHER,
    "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long": ps.OTHER,
}


@pytest.mark.parametrize("name,cls", sorted(PROFILED_NAMES.items()))
def test_kernel_class_of_profiled_names(name, cls):
    assert ps.kernel_class(name) == cls


def test_every_triton_kernel_of_the_package_has_a_class():
    names = []
    for path in glob.glob(os.path.join(ROOT, "nanovllm", "kernels", "*.py")):
        names += re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", open(path).read())
    assert len(names) >= 10
    unclassified = [n for n in names if ps.kernel_class(n) == ps.OTHER]
    assert not unclassified, f"add these kernels to profile_summary.KERNEL_CLASSES: {unclassified}"


def test_summarize_and_table_per_step():
    kernels = [KernelStat("_skinny_gemm_kernel", 2000.0, 40), KernelStat("nvjet_sm90_x", 1000.0, 20),
               KernelStat("_rms_norm_kernel", 500.0, 30), KernelStat("Memset (Device)", 10.0, 10)]
    s = ps.summarize(kernels, steps=10)
    assert s["gemv/gemm"] == (6.0, 0.3) and s["norm"] == (3.0, 0.05) and s[ps.OTHER] == (1.0, 0.001)
    assert s["attention"] == (0.0, 0.0) and set(s) == set(ps.CLASSES)
    rows = [{"model": "m", "batch": 1, "fused": True, "kernel_class": c, "launches_per_step": n, "gpu_ms_per_step": ms,
             "wall_ms_per_step": 0.9} for c, (n, ms) in s.items()]
    table = ps.markdown_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith("| m | 1 | True | 6 / 0.300 | 0 / 0.000 | 3 / 0.050 |")
    assert table[2].endswith("| 10 / 0.351 | 0.9 |")


def test_ncu_command_names_the_fused_kernel_range():
    cmd = ps.ncu_command("qwen3-0.6b:qkv:1")
    assert cmd.startswith("ncu --nvtx --nvtx-include fused/") and "dram__throughput" in cmd
    assert cmd.endswith("--ncu-target qwen3-0.6b:qkv:1")


@pytest.mark.slow
def test_profile_steps_on_cpu_leaves_the_engine_empty(tiny_model_factory):
    from nanovllm.bench.engines import release
    from profile_decode import decode_engine, profile_steps

    llm = decode_engine(tiny_model_factory("qwen3"), 2, 12, load_format="auto", device="cpu")
    prof = profile_steps(llm, 2, 12, steps=2)
    assert prof.wall_ms > 0 and prof.steps == 2 and prof.kernels == []  # no CUDA kernels on the CPU
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks  # aborted requests gave their blocks back
    release(llm)
