"""benchmarks/kernel_resources.py: Hopper register counts of the decode kernels, on the CPU.

Runs in a subprocess: the kernel tests' conftest sets TRITON_INTERPRET for the whole pytest
process, and interpreted kernels cannot be compiled for a GPU target.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "benchmarks", "kernel_resources.py")
MAX_REGISTERS = 255  # per thread, every NVIDIA GPU since Kepler
REGISTERS_PER_SM = 65536  # H100 / H200
# Decode attention must leave room for this many programs per SM (latency hiding at batch
# 256; the backed-out RoPE fusion used 239-255 registers, two programs per SM, and lost a
# third of the throughput).
MIN_DECODE_PROGRAMS_PER_SM = 3


def compiling_env() -> dict:
    """This environment without TRITON_INTERPRET (set for the whole pytest process by the kernel tests)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_tool(*args):
    proc = subprocess.run([sys.executable, TOOL, "--json", *args], capture_output=True, text=True,
                          env=compiling_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_decode_attention_and_rope_fit_in_registers_on_hopper():
    """Every decode-attention and RoPE launch the engine makes at the Qwen3-0.6B / 8B shapes
    compiles for sm_90 without spilling, and decode attention leaves room for several
    programs per SM."""
    pytest.importorskip("triton")
    rows = run_tool("--only", "decode", "--only", "rope")
    names = [r["kernel"] for r in rows]
    assert sum(n.startswith("decode attention") for n in names) == 4
    assert sum(n.startswith("rope") for n in names) == 2
    for r in rows:
        assert 0 < r["registers"] <= MAX_REGISTERS, r
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"spills: {r}"
        if r["kernel"].startswith("decode attention"):
            programs = REGISTERS_PER_SM // (r["registers"] * 32 * r["num_warps"])
            assert programs >= MIN_DECODE_PROGRAMS_PER_SM, f"{programs} programs per SM: {r}"


def test_recorded_launch_leaves_the_kernel_in_place():
    """The recorder swaps the kernel object only while the launcher runs."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import kernel_resources as kr; "
            "from nanovllm.kernels import rope_kv_store as m; k = m._rope_store_kernel; "
            "cases = list(kr._rope_cases()); assert m._rope_store_kernel is k; "
            "assert all(c[1] is k and c[2][1]['USE_PDL'] is False for c in cases); print(len(cases))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=compiling_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "2"
