"""KernelOptions: which kernels a model's layers launch, chosen once by the worker that owns them.

Why on the modules. A kernel choice made at start-up (Triton or the torch reference,
programmatic dependent launch, the GEMV prologue fusion) belongs to one engine's model: kept
in module-global state it would leak between two engines of one process and between tests.
Every layer that launches kernels has a `kernel_options` attribute (this class's defaults
until the worker calls `configure_kernels` on the whole model); each `Linear` also has its
own `gemv_rows` (linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class KernelOptions:
    triton: bool = True  # Triton kernels for CUDA tensors; False: the pure-torch reference everywhere
    triton_attention: bool = True  # attention through Triton on CUDA (attention_backend != "torch")
    pdl: bool = True  # programmatic dependent launch where the GPU supports it (kernels/pdl.py)
    fuse_gemv_prologues: bool = True  # the RMSNorm / SiLU-and-mul before a skinny GEMM runs inside it
    gemv_on_cpu: bool = False  # test hook: the skinny GEMM also serves CPU tensors (Triton interpreter)


DEFAULT_KERNEL_OPTIONS = KernelOptions()


def configure_kernels(model: nn.Module, options: KernelOptions) -> None:
    """Give every layer of `model` that launches kernels these options (one shared, frozen object)."""
    for module in model.modules():
        if hasattr(module, "kernel_options"):
            module.kernel_options = options
