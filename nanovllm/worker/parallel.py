"""Process groups of one tensor-parallel engine, and the checks made before any process starts.

Each rank of an engine holds two groups over one rendezvous store:

- the device group (NCCL on GPUs, gloo on CPU): the layers' all-reduces, the logits gather,
  the sampled tokens' broadcast (`layers.tp_group.TPGroup`);
- the control group (gloo, CPU tensors): each step's plain-data input from rank 0
  (`step_channel.py`), the agreement on a KV block count, start-up barriers.

The groups are built as objects of this engine (torch's ProcessGroup over a PrefixStore),
not through `torch.distributed.init_process_group`: that would make them the process's
global default group, and two engines in one process (tests, or a user's script that has its
own default group, e.g. under torchrun) would collide.

The rendezvous is a TCPStore: hosted by the engine's process on a free loopback port for
the ranks it spawns, or torchrun's (MASTER_ADDR / MASTER_PORT, read through envs.py) when
torchrun started the ranks, possibly on several hosts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from nanovllm import envs
from nanovllm.config import EngineConfig
from nanovllm.layers.partition import check_head_counts
from nanovllm.layers.tp_group import TPGroup

logger = logging.getLogger("nanovllm")

LOOPBACK = "127.0.0.1"
# How long ranks wait for each other to start, connect and finish loading (spawned processes
# import torch and load their shards before the first collective).
STARTUP_TIMEOUT = timedelta(minutes=30)
# A device collective waits only for a late rank (all ranks run the same step); past this a
# peer is presumed dead (torch's NCCL watchdog then aborts the process). Local worker deaths
# are seen in about a second through their process sentinels (worker_procs.py).
DEVICE_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Workers wait for rank 0's next step for as long as the engine stays idle.
CONTROL_TIMEOUT = timedelta(days=365)
STORE_PREFIX = "nanovllm"


@dataclass(frozen=True)
class Rendezvous:
    """How a rank reaches the others (picklable: handed to spawned workers)."""

    host: str
    port: int
    world_size: int
    torchrun: bool = False  # the store is torchrun's (its agent may host it)


def host_store(world_size: int) -> tuple[dist.TCPStore, Rendezvous]:
    """A TCPStore on a free loopback port, hosted by this (rank 0's) process."""
    store = dist.TCPStore(LOOPBACK, 0, world_size, True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
    return store, Rendezvous(LOOPBACK, store.port, world_size)


def connect_store(rendezvous: Rendezvous, rank: int) -> dist.Store:
    if rendezvous.torchrun:  # torchrun's handler knows whether its agent hosts the store
        url = f"tcp://{rendezvous.host}:{rendezvous.port}?rank={rank}&world_size={rendezvous.world_size}"
        store, _, _ = next(iter(dist.rendezvous(url, timeout=STARTUP_TIMEOUT)))
        return store
    return dist.TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, False, timeout=STARTUP_TIMEOUT)


class ParallelGroups:
    """This rank's device and control groups (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device, name: str) -> None:
        self.rank, self.world_size = rank, world_size
        self.store = dist.PrefixStore(f"{STORE_PREFIX}/{name}/", store)
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.device_group_is_nccl = backend == "nccl"
        self.device_group = _new_group(self.store, "device", rank, world_size, backend, device,
                                       DEVICE_COLLECTIVE_TIMEOUT)
        self.control = _new_group(self.store, "control", rank, world_size, "gloo", torch.device("cpu"),
                                  CONTROL_TIMEOUT)
        self.tp = TPGroup(rank, world_size, self.device_group)

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` of all ranks (e.g. the KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.control.allreduce([t], opts).wait()
        return int(t.item())

    def barrier(self) -> None:
        t = torch.zeros(1)
        self.control.allreduce([t], dist.AllreduceOptions()).wait()

    def abort(self) -> None:
        """Make pending collectives fail (NCCL aborts its communicators); best effort."""
        for group in (self.device_group, self.control):
            if group is None:  # already shut down
                continue
            try:
                group.abort()
            except Exception as e:  # already broken or unsupported: nothing more to do
                logger.debug("abort of a process group failed: %r", e)

    def shutdown(self) -> None:
        """Release the groups' connections. NCCL communicators are aborted, not finalized: a
        finalize waits for the other ranks, which may be gone already."""
        for group, nccl in ((self.device_group, self.device_group_is_nccl), (self.control, False)):
            if group is None:
                continue
            try:
                group.abort() if nccl else group.shutdown()
            except Exception as e:
                logger.debug("shutdown of a process group failed: %r", e)
        # Drop them now, while the interpreter is whole: a gloo group destroyed during its
        # teardown can end the process with "terminate called without an active exception".
        self.device_group = self.control = None


def _new_group(store: dist.Store, name: str, rank: int, world_size: int, backend: str, device: torch.device,
               timeout: timedelta) -> dist.ProcessGroup:
    """A ProcessGroup of one backend, built directly (not registered as torch's default group)."""
    prefix = dist.PrefixStore(f"{name}/", store)
    group = dist.ProcessGroup(prefix, rank, world_size)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        impl = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", prefix), rank, world_size, options)
        backend_type = dist.ProcessGroup.BackendType.NCCL
        device = torch.device("cuda")
    else:
        impl = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", prefix), rank, world_size, timeout)
        backend_type = dist.ProcessGroup.BackendType.GLOO
        device = torch.device("cpu")
    impl._set_sequence_number_for_group()
    group._register_backend(device, backend_type, impl)
    group._set_default_backend(backend_type)
    group._set_group_name(f"nanovllm-{name}-{id(group):x}")
    return group


# ----------------------------------------------------------------------------- checks


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    """The device a rank runs on: its own GPU (cuda:local_rank) or the CPU."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if config.device.startswith("cuda:") and config.tensor_parallel_size == 1:
        return torch.device(config.device)
    return torch.device("cuda", local_rank)


def validate_parallel_config(config: EngineConfig, hf_config, torchrun: Optional[envs.TorchrunEnv]) -> None:
    """ValueError, saying what to change, when this engine cannot be split as asked (checked
    before any worker process starts)."""
    world = config.tensor_parallel_size
    if world > 1:
        from nanovllm.models.registry import resolve_model_class

        model_cls = resolve_model_class(hf_config)
        if not getattr(model_cls, "supports_tensor_parallel", False):
            raise ValueError(f"{model_cls.__name__} cannot be split over ranks yet: run it with tensor_parallel_size=1 "
                             f"(docs/models.md lists the families that support tensor parallelism)")
        if config.kv_cache_dtype == "fp8":  # its scales are per layer and KV head of one model
            raise ValueError(f"kv_cache_dtype='fp8' is not available with tensor_parallel_size={world} yet: use "
                             f"kv_cache_dtype='auto', or tensor_parallel_size=1")
        if config.quantization is not None:  # quantized linears hold whole weights (no shards yet)
            raise ValueError(f"quantization={config.quantization!r} is not available with tensor_parallel_size={world} "
                             f"yet: leave quantization unset (bf16/fp16 weights are split), or use "
                             f"tensor_parallel_size=1")
        if getattr(hf_config, "quantization_config", None) is not None:
            raise ValueError(f"a pre-quantized (GPTQ / AWQ) checkpoint cannot be split over tensor_parallel_size={world} "
                             f"ranks yet: use tensor_parallel_size=1, or a bf16/fp16 checkpoint")
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    check_head_counts(num_heads, num_kv_heads, world)
    if torchrun is not None and torchrun.world_size != world:
        raise ValueError(f"torchrun started {torchrun.world_size} processes (WORLD_SIZE) but tensor_parallel_size="
                         f"{world}: start one process per rank (torchrun --nproc-per-node ... x nodes = {world})")
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if on_cpu:
        cores = os.cpu_count() or 1
        if torchrun is None and world > cores:
            raise ValueError(f"tensor_parallel_size={world} CPU processes exceed the {cores} CPU cores")
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but no CUDA device is available; use device='cpu' or 'auto'")
    visible = torch.cuda.device_count()
    if torchrun is not None:
        if torchrun.local_rank >= visible:
            raise ValueError(f"LOCAL_RANK={torchrun.local_rank} but this host sees {visible} GPU(s): start at most "
                             f"{visible} processes per host (torchrun --nproc-per-node)")
        return
    if config.device.startswith("cuda:") and world > 1:
        raise ValueError(f"device={config.device!r} names one GPU but tensor_parallel_size={world} uses GPUs "
                         f"0..{world - 1}: pass device='cuda' and pick the GPUs with CUDA_VISIBLE_DEVICES")
    if world > visible:
        raise ValueError(f"tensor_parallel_size={world} exceeds the {visible} visible GPU(s); use at most {visible} "
                         f"(or make more visible with CUDA_VISIBLE_DEVICES)")
