"""Linear layers whose weights load from several checkpoint tensors.

Packed projections (one GEMM instead of three or two): `qkv_proj` holds q, k, v rows
stacked; `gate_up_proj` holds gate and up rows. Each parameter carries a
`weight_loader(param, tensor, shard)` that copies a checkpoint tensor into its slice.

GEMM dispatch (`Linear.forward`): cuBLAS (`F.linear`) by default. For an explicit set of
weight shapes `(N, K, dtype)` (`set_gemv_shapes`, empty by default, normally filled by
`nanovllm.kernels.gemv.calibrate_gemv`, which times both on the model's shapes), calls with
at most `max_m` rows (leading dims flattened) on CUDA use the Triton skinny GEMM
(`kernels/gemv.py`), which streams the weight at closer to HBM bandwidth than cuBLAS's
small-M tiles. The CPU fp16-packed path is unaffected.

When the skinny GEMM serves a call, the elementwise op in front of it runs inside it
(`Linear.forward_after_norm`: residual add + RMSNorm before qkv / gate_up;
`forward_after_silu_mul`: the MLP activation before down): two launches fewer per decoder
layer at decode batch sizes. `NANOVLLM_GEMV_FUSE=0` keeps them separate (A/B timing).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers import ops

logger = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- GEMV policy

_gemv_shapes: frozenset = frozenset()  # {(N, K, weight dtype)} that use the Triton skinny GEMM
_gemv_max_m = 0  # at most this many rows (x.numel() // K); 0 = never
_gemv_row_limit: dict = {}  # (N, K, dtype) -> its own row limit (<= _gemv_max_m), where set
_gemv_allow_cpu = False  # test hook: also dispatch CPU tensors (the kernel then runs in the Triton interpreter)
_gemv = None  # the nanovllm.kernels.gemv module, imported when a policy is first set
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def gemv_shapes() -> frozenset:
    """The (N, K, dtype) weight shapes now served by the Triton skinny GEMM."""
    return _gemv_shapes


def set_gemv_shapes(shapes, max_m: Optional[int] = None, allow_cpu: bool = False) -> None:
    """Serve Linear calls with a weight of shape `(N, K)` and dtype in `shapes` and at most
    `max_m` rows (default and cap `gemv.GEMV_MAX_M`) with the Triton skinny GEMM, on CUDA.
    `shapes` is an iterable of `(N, K, dtype)`, or a dict mapping each to its own row limit
    (the kernel may beat cuBLAS at 1 row and lose at 8). An empty `shapes` restores cuBLAS
    everywhere. `allow_cpu` is a test hook only (CPU tensors through the Triton
    interpreter). Set it before CUDA-graph capture: graphs keep whichever GEMM they captured."""
    global _gemv_shapes, _gemv_max_m, _gemv_allow_cpu, _gemv, _gemv_row_limit
    limits = dict(shapes) if isinstance(shapes, dict) else {}
    shapes = frozenset((int(n), int(k), dtype) for n, k, dtype in shapes)
    if shapes and _gemv is None:
        from nanovllm.kernels import gemv

        _gemv = gemv
    cap = _gemv.GEMV_MAX_M if _gemv is not None else 0
    _gemv_max_m = cap if max_m is None else max(0, min(int(max_m), cap))
    _gemv_row_limit = {(int(n), int(k), dtype): min(int(m), _gemv_max_m) for (n, k, dtype), m in limits.items()}
    _gemv_shapes, _gemv_allow_cpu = shapes, bool(allow_cpu)


def gemv_row_limits() -> dict:
    """{(N, K, dtype): most rows served by the Triton kernel} of the shapes now enabled."""
    return {key: _gemv_row_limit.get(key, _gemv_max_m) for key in _gemv_shapes}


def _use_gemv(x: torch.Tensor, weight: torch.Tensor, x_features: Optional[int] = None) -> bool:
    """Whether this call goes to the Triton skinny GEMM (policy non-empty: checked by the caller).
    `x_features`: x's last dim when it is not K (the [gate | up] input of the SiLU prologue)."""
    if weight.dim() != 2 or type(weight) not in _PLAIN_TENSOR_TYPES:
        return False
    n, k = weight.shape
    key = (n, k, weight.dtype)
    if key not in _gemv_shapes or x.dtype != weight.dtype or x.shape[-1] != (x_features or k) or k == 0:
        return False
    if not (x.is_cuda and weight.is_cuda) and not _gemv_allow_cpu:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):  # the kernel has no backward
        return False
    limit = _gemv_row_limit.get(key, _gemv_max_m)
    return 0 < x.numel() // (x_features or k) <= limit and weight.stride(1) == 1 and x.device == weight.device


def _gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    k = weight.shape[1]
    try:
        out = _gemv.skinny_gemm(x.reshape(-1, k), weight, bias)  # [M, N]
    except _gemv.NotTunedError as e:  # first call of a shape inside a graph capture: keep cuBLAS there
        logger.warning("%s; this graph uses cuBLAS for it", e)
        return F.linear(x, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _fuse_prologues() -> bool:
    return os.environ.get("NANOVLLM_GEMV_FUSE", "1").strip() != "0"


def _fusable_norm(x: torch.Tensor, residual: Optional[torch.Tensor], norm) -> bool:
    w = norm.weight
    return (_fuse_prologues() and x.dim() == 2 and x.stride(-1) == 1 and w.dtype == x.dtype and w.dim() == 1
            and w.stride(0) == 1
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                      and residual.stride(-1) == 1)))


# ----------------------------------------------------------------------------- layers


class Linear(nn.Module):
    """y = x W^T (+ b), W `[out_features, in_features]`.

    On CPU the weight can be packed to fp16 for fbgemm (`pack_fp16_for_cpu`): half the bytes
    to stream per GEMM, fp32 activations and accumulation. Used for checkpoints whose own
    precision is 16 bits or less, which fp16 represents (nearly) exactly.
    """

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

    def pack_fp16_for_cpu(self) -> None:
        bias = None if self.bias is None else self.bias.detach().float()
        self.packed_fp16 = torch.ops.quantized.linear_prepack_fp16(self.weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_fp16 is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed_fp16)
        if _gemv_shapes and _use_gemv(x, self.weight):
            return _gemv_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_after_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor], norm) -> tuple:
        """`norm` (an RMSNorm: residual add when residual is given) then this projection.

        Returns (projection [T, N], new residual [T, K]); with residual None the new residual
        is x. One kernel when the skinny GEMM serves this call, else the two layers.
        """
        if (self.packed_fp16 is None and _gemv_shapes and _use_gemv(x, self.weight)
                and _fusable_norm(x, residual, norm)):
            try:
                return _gemv.rms_norm_skinny_gemm(x, residual, norm.weight, norm.eps, self.weight, self.bias)
            except _gemv.NotTunedError as e:
                logger.warning("%s; this graph runs the norm and the projection separately", e)
        if residual is None:
            return self(norm(x)), x
        hidden, residual = norm(x, residual)
        return self(hidden), residual

    def forward_after_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[..., :K]) * x[..., K:] then this projection; one kernel when the skinny GEMM
        serves this call."""
        k = self.in_features
        if (self.packed_fp16 is None and _gemv_shapes and _fuse_prologues() and x.dim() == 2
                and _use_gemv(x, self.weight, x_features=2 * k)):
            try:
                return _gemv.silu_mul_skinny_gemm(x, self.weight, self.bias)
            except _gemv.NotTunedError as e:
                logger.warning("%s; this graph runs the activation and the projection separately", e)
        return self(ops.silu_and_mul(x))


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
