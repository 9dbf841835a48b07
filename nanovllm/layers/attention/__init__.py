"""Paged attention: the layer (`layer.py`) and its backends, one file each.

- `triton_backend.py`: the Triton kernels (kernels/paged_attention.py, kernels/rope_kv_store.py)
  for CUDA tensors;
- `torch_backend.py`: the CPU path in plain torch (batched decode, SDPA for prefills);
- `kernels/reference.py`: the simple truth both are tested against, also used for CUDA
  tensors when Triton is switched off.

`PagedAttention` picks one per call from its `KernelOptions` and the tensors' device.
"""

from nanovllm.layers.attention.layer import PagedAttention

__all__ = ["PagedAttention"]
