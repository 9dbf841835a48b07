"""Linear layers whose weights load from several checkpoint tensors.

Packed projections (one GEMM instead of three or two): `qkv_proj` holds q, k, v rows
stacked; `gate_up_proj` holds gate and up rows. Each parameter carries a
`weight_loader(param, tensor, shard)` that copies a checkpoint tensor into its slice.

GEMM dispatch (`Linear.forward`): cuBLAS (`F.linear`) by default. A Linear whose
`gemv_rows` is above 0 serves calls with at most that many rows (leading dims flattened)
on CUDA with the Triton skinny GEMM (`kernels/gemv.py`), which streams the weight at closer
to HBM bandwidth than cuBLAS's small-M tiles. The worker sets `gemv_rows` per weight shape
(`set_gemv_rows`, from its calibration); it lives on the module, so two models in one
process never share a choice. The CPU fp16-packed path is unaffected. The modules that
fold the op in front of a projection into the same kernel are in norm_linear.py.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS

logger = logging.getLogger(__name__)

GemvShape = tuple[int, int, torch.dtype]  # (N, K, weight dtype)
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""


def check_shape(name: str, expected: tuple, got: tuple) -> None:
    if tuple(expected) != tuple(got):
        raise WeightShapeError(f"tensor {name!r}: expected shape {tuple(expected)}, checkpoint has {tuple(got)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard=None, name: str = "") -> None:
    check_shape(name, param.shape, loaded.shape)
    param.data.copy_(loaded)


def cpu_fp16_gemm_available() -> bool:
    """fbgemm's fp16-weight GEMM (x86 CPUs); absent on other builds."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 1), packed)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def gemv_kernels():
    """kernels/gemv.py, imported when a skinny GEMM first runs (it imports triton); callers
    look its functions up at call time."""
    from nanovllm.kernels import gemv

    return gemv


# ----------------------------------------------------------------------------- layers


class Linear(nn.Module):
    """y = x W^T (+ b), W `[out_features, in_features]`.

    On CPU the weight can be packed to fp16 for fbgemm (`pack_fp16_for_cpu`): half the bytes
    to stream per GEMM, fp32 activations and accumulation. Used for checkpoints whose own
    precision is 16 bits or less, which fp16 represents (nearly) exactly.

    Subclasses with other weight formats (quantized linears) override `forward` and set
    `supports_gemv = False` unless they run the skinny GEMM on their own weights.
    """

    supports_gemv = True  # the Triton skinny GEMM may serve this layer (plain 2-D float weight)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = default_weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = default_weight_loader
        self.packed_fp16 = None
        self.gemv_rows = 0  # calls with at most this many rows use the Triton skinny GEMM; 0 = never
        self.kernel_options = DEFAULT_KERNEL_OPTIONS

    def pack_fp16_for_cpu(self) -> None:
        bias = None if self.bias is None else self.bias.detach().float()
        self.packed_fp16 = torch.ops.quantized.linear_prepack_fp16(self.weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_fp16 is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed_fp16)
        if self.gemv_rows and self.uses_gemv(x):
            return self._gemv(x)
        return F.linear(x, self.weight, self.bias)

    def uses_gemv(self, x: torch.Tensor, x_features: Optional[int] = None) -> bool:
        """Whether this call goes to the Triton skinny GEMM. `x_features`: x's last dim when it
        is not K (the [gate | up] input of the SiLU prologue)."""
        weight = self.weight
        if not self.gemv_rows or self.packed_fp16 is not None or type(weight) not in _PLAIN_TENSOR_TYPES:
            return False
        k = weight.shape[1]
        if x.dtype != weight.dtype or x.shape[-1] != (x_features or k) or k == 0:
            return False
        if not (x.is_cuda and weight.is_cuda) and not self.kernel_options.gemv_on_cpu:
            return False
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):  # the kernel has no backward
            return False
        return (0 < x.numel() // (x_features or k) <= self.gemv_rows and weight.stride(1) == 1
                and x.device == weight.device)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        gemv = gemv_kernels()
        k = self.weight.shape[1]
        try:
            out = gemv.skinny_gemm(x.reshape(-1, k), self.weight, self.bias, pdl=self.kernel_options.pdl)  # [M, N]
        except gemv.NotTunedError as e:  # first call of a shape inside a graph capture: keep cuBLAS there
            logger.warning("%s; this graph uses cuBLAS for it", e)
            return F.linear(x, self.weight, self.bias)
        return out.view(*x.shape[:-1], self.weight.shape[0])


def gemv_shape(layer: Linear) -> GemvShape:
    n, k = layer.weight.shape
    return int(n), int(k), layer.weight.dtype


def set_gemv_rows(model: nn.Module, rows: Mapping[GemvShape, int]) -> None:
    """Serve each Linear of `model` whose weight shape `(N, K, dtype)` is in `rows` with the
    Triton skinny GEMM for calls of at most that many rows (capped at the kernel's
    GEMV_MAX_M); every other Linear uses cuBLAS. Set it before CUDA-graph capture: graphs keep
    whichever GEMM they captured."""
    cap = gemv_kernels().GEMV_MAX_M if any(rows.values()) else 0
    for module in model.modules():
        if isinstance(module, Linear) and module.supports_gemv:
            module.gemv_rows = max(0, min(int(rows.get(gemv_shape(module), 0)), cap))


def gemv_rows(model: nn.Module) -> dict[GemvShape, int]:
    """{(N, K, dtype): row limit} of the Linear shapes of `model` that use the skinny GEMM."""
    return {gemv_shape(m): m.gemv_rows for m in model.modules() if isinstance(m, Linear) and m.gemv_rows}


class PackedLinear(Linear):
    """Several projections of the same input packed into one weight, row blocks in order."""

    def __init__(self, in_features: int, shard_sizes: dict[Union[str, int], int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict = {}
        offset = 0
        for shard, size in shard_sizes.items():
            self.shard_offsets[shard] = (offset, size)
            offset += size
        self.weight.weight_loader = self.load_shard
        if self.bias is not None:
            self.bias.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard=None, name: str = "") -> None:
        if shard not in self.shard_offsets:
            raise WeightShapeError(f"tensor {name!r}: unknown shard {shard!r} of a packed projection")
        offset, size = self.shard_offsets[shard]
        target = param.data.narrow(0, offset, size)
        check_shape(name, target.shape, loaded.shape)
        target.copy_(loaded)


class QKVLinear(PackedLinear):
    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        super().__init__(
            hidden, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}, bias
        )


class GateUpLinear(PackedLinear):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__(hidden, {0: intermediate, 1: intermediate}, bias=False)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(Linear):
    """Vocabulary projection, applied only to the rows whose logits are needed."""

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__(hidden, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        if indices is not None:
            hidden = hidden[indices]  # [num_selected, hidden]
        return super().forward(hidden)  # [num_selected, vocab]
