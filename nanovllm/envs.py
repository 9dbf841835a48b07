"""Every environment variable nanovllm reads, declared once: name, default, meaning.

Behaviour switches are EngineConfig fields; the NANOVLLM_* variables below that mirror a
field are benchmarking overrides (A/B runs of one command line), read once when an engine
starts (`config_overrides`), never on a hot path. Nothing else in the package reads
`os.environ`. This module imports nothing of nanovllm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: Optional[str]  # None: unset means "not given"
    meaning: str
    config_field: Optional[str] = None  # the EngineConfig field it overrides, if any
    parse: Optional[Callable[[str], object]] = None  # text -> the field's value

    def get(self) -> Optional[str]:
        return os.environ.get(self.name, self.default)


def _gemv_mode(text: str) -> str:  # also the cascade mode: the same three words
    text = text.strip().lower()
    return {"0": "off", "off": "off", "force": "force", "1": "auto", "auto": "auto"}.get(text, text)


def _on_unless_zero(text: str) -> bool:
    return text.strip() != "0"


def _on_if_one(text: str) -> bool:
    return text.strip() == "1"


def _off_if_one(text: str) -> bool:
    return text.strip() != "1"


NANOVLLM_GEMV = EnvVar(
    "NANOVLLM_GEMV", None,
    "GEMV dispatch of decode-sized GEMMs: 0 = cuBLAS only, force = the Triton skinny GEMM for every "
    "shape without timing, unset/auto = calibrated per shape", "gemv", _gemv_mode)
NANOVLLM_GEMV_FUSE = EnvVar(
    "NANOVLLM_GEMV_FUSE", None,
    "0 = run the RMSNorm / SiLU-and-mul in front of a skinny GEMM as separate kernels", "fuse_gemv_prologues",
    _on_unless_zero)
NANOVLLM_PDL = EnvVar(
    "NANOVLLM_PDL", None, "0 = launch the decode kernels without programmatic dependent launch", "pdl",
    _on_unless_zero)
NANOVLLM_CASCADE = EnvVar(
    "NANOVLLM_CASCADE", None,
    "cascade attention over shared prefixes: 0 = off, force = whenever blocks are shared, unset/1/auto = when it "
    "pays", "cascade_attention", _gemv_mode)
NANOVLLM_DISABLE_TRITON = EnvVar(
    "NANOVLLM_DISABLE_TRITON", None, "1 = every op through its pure-torch reference (debugging, A/B)",
    "use_triton", _off_if_one)
NANOVLLM_STEP_TIMING = EnvVar(
    "NANOVLLM_STEP_TIMING", None, "1 = accumulate the wall time of each phase of an engine step (benchmarks)",
    "step_timing", _on_if_one)
NANOVLLM_API_KEY = EnvVar(
    "NANOVLLM_API_KEY", None, "the API key `nanovllm serve` requires and `nanovllm bench serve` sends")
OPENAI_API_KEY = EnvVar("OPENAI_API_KEY", None, "fallback API key of `nanovllm bench serve` (OpenAI clients' name)")
NANOVLLM_COMMIT = EnvVar(
    "NANOVLLM_COMMIT", None, "commit recorded in benchmark CSVs (trees copied without .git)")
HF_HUB_OFFLINE = EnvVar(
    "HF_HUB_OFFLINE", None, "huggingface_hub's own switch, read here too: 1 = never download a hub model (a "
    "repo id must already be in the cache)")
TRITON_INTERPRET = EnvVar(
    "TRITON_INTERPRET", None, "Triton's own switch, read here only to know that kernels run in Triton's CPU "
    "interpreter (no autotuning, no PDL)")

# torchrun's (torch.distributed.run) variables: a tensor-parallel engine launched by torchrun
# (one process per rank, possibly on several hosts) takes its rank and rendezvous from them.
RANK = EnvVar("RANK", None, "torchrun: this process's global rank (rank 0 runs the engine, the others a worker)")
LOCAL_RANK = EnvVar("LOCAL_RANK", None, "torchrun: this process's rank on its host (its GPU index)")
WORLD_SIZE = EnvVar("WORLD_SIZE", None, "torchrun: number of processes; must equal tensor_parallel_size")
MASTER_ADDR = EnvVar("MASTER_ADDR", None, "torchrun: host of rank 0's rendezvous store")
MASTER_PORT = EnvVar("MASTER_PORT", None, "torchrun: port of the rendezvous store")

ALL = (NANOVLLM_GEMV, NANOVLLM_GEMV_FUSE, NANOVLLM_PDL, NANOVLLM_CASCADE, NANOVLLM_DISABLE_TRITON,
       NANOVLLM_STEP_TIMING, NANOVLLM_API_KEY, OPENAI_API_KEY, NANOVLLM_COMMIT, HF_HUB_OFFLINE, TRITON_INTERPRET,
       RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)


def config_overrides() -> dict[str, object]:
    """{EngineConfig field: value} for every overriding variable that is set (read once per engine)."""
    out = {}
    for var in ALL:
        text = os.environ.get(var.name) if var.config_field else None
        if text is not None and text.strip() != "":
            out[var.config_field] = var.parse(text)
    return out


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return TRITON_INTERPRET.get() == "1"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (1, true, yes, on)."""
    return (HF_HUB_OFFLINE.get() or "").strip().lower() in ("1", "true", "yes", "on")


def api_key(*, openai_fallback: bool = False) -> Optional[str]:
    """For clients (`nanovllm bench serve`): NANOVLLM_API_KEY, else OPENAI_API_KEY; None when
    neither is set or empty. The server reads NANOVLLM_API_KEY itself (serve/cli.py
    resolve_api_key) and refuses an empty one."""
    return NANOVLLM_API_KEY.get() or (OPENAI_API_KEY.get() if openai_fallback else None) or None


def commit() -> Optional[str]:
    return NANOVLLM_COMMIT.get() or None


@dataclass(frozen=True)
class TorchrunEnv:
    """The rendezvous torchrun gives each process it starts."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def torchrun_env() -> Optional[TorchrunEnv]:
    """torchrun's settings when this process was started by it (RANK and WORLD_SIZE set), else None.
    ValueError when they are set but malformed."""
    rank, world = RANK.get(), WORLD_SIZE.get()
    if not rank or not world:
        return None
    try:
        return TorchrunEnv(int(rank), int(LOCAL_RANK.get() or rank), int(world), MASTER_ADDR.get() or "127.0.0.1",
                           int(MASTER_PORT.get() or 29500))
    except ValueError:
        raise ValueError(f"torchrun variables RANK={rank!r} WORLD_SIZE={world!r} LOCAL_RANK={LOCAL_RANK.get()!r} "
                         f"MASTER_PORT={MASTER_PORT.get()!r} must be integers") from None
