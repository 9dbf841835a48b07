"""Linear layers: plain, tensor-parallel (column / row), packed, and the vocabulary's.

Tensor parallelism (Megatron-LM's split; the arithmetic is in partition.py). Models pass full
sizes; each layer allocates its rank's share and sets `param.tp_shard` on its parameters so
the loader reads only that slice of each checkpoint tensor:

- `ColumnParallelLinear`: output rows split (packed parts split each: `QKVLinear` holds its
  rank's q heads and kv heads, `GateUpLinear` its halves of gate and up); no communication.
- `RowParallelLinear`: input columns split to match the column-parallel layer in front;
  the partial outputs are summed by one all-reduce (o_proj, down_proj).
- `VocabEmbedding` (masked lookup + all-reduce) and `LMHead` (logits gathered on rank 0,
  the sampling rank), over the vocabulary padded to a multiple of the world size.

At world size 1 every one of them is the plain layer (no collective, same shapes). Each
layer's `partition` (a `LinearPartition`) is the one description of its split: the loader
and quantized linears map it onto their tensors (`partition.param_shard`).

Packed projections (one GEMM instead of three or two): `qkv_proj` holds q, k, v rows
stacked; `gate_up_proj` holds gate and up rows. Each parameter carries a
`weight_loader(param, tensor, shard)` that copies a checkpoint tensor (already cut to the
rank's slice) into its place.

GEMM dispatch (`Linear.forward`): cuBLAS (`F.linear`) by default. A Linear whose
`gemv_rows` is above 0 serves calls with at most that many rows (leading dims flattened)
on CUDA with the Triton skinny GEMM (`kernels/gemv.py`), which streams the weight at closer
to HBM bandwidth than cuBLAS's small-M tiles. The worker sets `gemv_rows` per weight shape
(`set_gemv_rows`, from its calibration; per rank, on the rank's shard shapes); it lives on
the module, so two models in one process never share a choice. The CPU fp16-packed path is
unaffected. The modules that fold the op in front of a projection into the same kernel are
in norm_linear.py.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS
from nanovllm.layers.partition import (LinearPartition, ParamShard, ShardRange, column_linear, even_column_linear,
                                       head_partition, replicated_linear, row_linear, vocab_partition)
from nanovllm.layers.tp_group import SINGLE, TPGroup, build_group

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

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 partition: Optional[LinearPartition] = None, tp: TPGroup = SINGLE) -> None:
        """A replicated layer unless `partition` splits it (the parallel subclasses pass one);
        in_features / out_features are then this rank's shares."""
        super().__init__()
        self.tp = tp
        self.partition = partition or replicated_linear(in_features, {None: out_features})
        in_features, out_features = self.partition.local_in_features, self.partition.local_out_features
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = default_weight_loader
        self.weight.tp_shard = self.partition.param_shard(out_dim=0, in_dim=1)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = default_weight_loader
            self.bias.tp_shard = self.partition.param_shard(out_dim=0, is_bias=True)
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


class ColumnParallelLinear(Linear):
    """Output rows split over the tensor-parallel ranks (no communication: each rank's output
    is its share of the features). `out_features` is the full row count, or a dict of packed
    parts {id: full rows} stacked in order (each part split on its own); `out_ranges` picks
    the rows of each part this rank holds (default: an even split)."""

    def __init__(self, in_features: int, out_features: Union[int, Mapping], bias: bool = False,
                 tp: Optional[TPGroup] = None, out_ranges: Optional[Mapping] = None) -> None:
        tp = tp or build_group()
        parts = dict(out_features) if isinstance(out_features, Mapping) else {None: out_features}
        partition = (column_linear(in_features, out_ranges, parts, tp.world_size, tp.rank) if out_ranges
                     else even_column_linear(in_features, parts, tp.world_size, tp.rank))
        super().__init__(in_features, sum(parts.values()), bias, partition=partition, tp=tp)
        # part -> (first local row, local rows)
        self.shard_offsets = {s: (partition.local_out_offsets[s], r.size) for s, r in partition.out_ranges.items()}
        self.weight.weight_loader = self.load_shard
        if self.bias is not None:
            self.bias.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard=None, name: str = "") -> None:
        """Copy a checkpoint tensor's rows (this rank's slice of part `shard`) into place."""
        if shard not in self.shard_offsets:
            raise WeightShapeError(f"tensor {name!r}: unknown shard {shard!r} of a packed projection")
        offset, size = self.shard_offsets[shard]
        target = param.data.narrow(0, offset, size)
        check_shape(name, target.shape, loaded.shape)
        target.copy_(loaded)


class PackedLinear(ColumnParallelLinear):
    """Several projections of the same input packed into one weight, row blocks in order."""

    def __init__(self, in_features: int, shard_sizes: dict[Union[str, int], int], bias: bool = False,
                 tp: Optional[TPGroup] = None, out_ranges: Optional[Mapping] = None) -> None:
        super().__init__(in_features, shard_sizes, bias, tp=tp, out_ranges=out_ranges)


class QKVLinear(PackedLinear):
    """q, k, v projections packed; each rank holds its q heads and the kv heads they use
    (kv heads replicated when there are fewer than ranks). `num_heads` / `num_kv_heads`
    are this rank's counts."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: Optional[TPGroup] = None) -> None:
        tp = tp or build_group()
        heads = head_partition(num_heads, num_kv_heads, tp.world_size, tp.rank)
        q_rows = ShardRange(heads.q_heads.start * head_dim, heads.num_heads * head_dim)
        kv_rows = ShardRange(heads.kv_heads.start * head_dim, heads.num_kv_heads * head_dim)
        super().__init__(hidden, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                  "v": num_kv_heads * head_dim}, bias, tp=tp,
                         out_ranges={"q": q_rows, "k": kv_rows, "v": kv_rows})
        self.heads = heads
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, head_dim


class GateUpLinear(PackedLinear):
    """gate and up projections packed; each rank holds the same rows of both."""

    def __init__(self, hidden: int, intermediate: int, tp: Optional[TPGroup] = None) -> None:
        super().__init__(hidden, {0: intermediate, 1: intermediate}, bias=False, tp=tp)


class RowParallelLinear(Linear):
    """Input columns split over the ranks (matching the column-parallel layer in front: its
    output is this layer's input, already split); the ranks' partial outputs are summed by an
    all-reduce, so every rank ends with the full output. A bias is added by rank 0 only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: Optional[TPGroup] = None,
                 in_range: Optional[ShardRange] = None) -> None:
        tp = tp or build_group()
        super().__init__(in_features, out_features, bias,
                         partition=row_linear(in_features, out_features, tp.world_size, tp.rank, in_range), tp=tp)
        self.reduce = self.partition.reduces_output  # False at world size 1: no collective at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return self.tp.all_reduce(out) if self.reduce else out


# ----------------------------------------------------------------------------- vocabulary


def load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, shard=None, name: str = "") -> None:
    """This rank's checkpoint rows of a vocabulary tensor; its padding rows are zeros."""
    rows = loaded.shape[0]
    check_shape(name, (rows, *param.shape[1:]), loaded.shape)
    if rows > param.shape[0]:
        raise WeightShapeError(f"tensor {name!r}: {rows} rows for a {param.shape[0]}-row vocabulary shard")
    param.data[:rows].copy_(loaded)
    param.data[rows:].zero_()


class VocabEmbedding(nn.Module):
    """Token embedding; with tensor parallelism each rank holds a run of vocabulary rows, looks
    up the tokens that fall in it (zeros for the others) and an all-reduce adds the ranks up."""

    def __init__(self, vocab_size: int, hidden: int, tp: Optional[TPGroup] = None) -> None:
        super().__init__()
        self.tp = tp or build_group()
        self.vocab = vocab_partition(vocab_size, self.tp.world_size, self.tp.rank)
        self.weight = nn.Parameter(torch.empty(self.vocab.rows.size, hidden))
        self.weight.weight_loader = load_vocab_rows if self.tp.world_size > 1 else default_weight_loader
        self.weight.tp_shard = vocab_shard(self.vocab) if self.tp.world_size > 1 else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab.rows.start  # [T]
        outside = (local < 0) | (local >= self.vocab.rows.size)  # [T] tokens another rank holds
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


def vocab_shard(vocab) -> ParamShard:
    return ParamShard(0, {None: vocab.checkpoint_rows}, {None: vocab.vocab_size})


class LMHead(Linear):
    """Vocabulary projection, applied only to the rows whose logits are needed. With tensor
    parallelism each rank computes its vocabulary rows' logits and rank 0 gathers them (the
    padding columns dropped); the other ranks get None (they do not sample)."""

    def __init__(self, hidden: int, vocab_size: int, tp: Optional[TPGroup] = None) -> None:
        tp = tp or build_group()
        vocab = vocab_partition(vocab_size, tp.world_size, tp.rank)
        partition = (even_column_linear(hidden, {None: vocab.padded_vocab_size}, tp.world_size, tp.rank)
                     if tp.world_size > 1 else None)
        super().__init__(hidden, vocab_size, bias=False, partition=partition, tp=tp)
        self.vocab = vocab
        if tp.world_size > 1:
            self.weight.weight_loader = load_vocab_rows
            self.weight.tp_shard = vocab_shard(vocab)

    def forward(self, hidden: torch.Tensor, indices: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if indices is not None:
            hidden = hidden[indices]  # [num_selected, hidden]
        logits = super().forward(hidden)  # [num_selected, vocab rows of this rank]
        if self.tp.world_size == 1:
            return logits
        parts = self.tp.gather_to_first(logits)  # rank 0: world_size x [num_selected, padded / world_size]
        if parts is None:
            return None
        if self.vocab.padded_vocab_size > self.vocab.vocab_size:
            parts = _drop_padding(parts, self.vocab.vocab_size)
        return torch.cat(parts, dim=-1)  # [num_selected, vocab]


def _drop_padding(parts: list[torch.Tensor], vocab_size: int) -> list[torch.Tensor]:
    """The ranks' logits without the padding columns (all at the end of the vocabulary)."""
    out, left = [], vocab_size
    for p in parts:
        take = max(0, min(p.shape[-1], left))
        out.append(p[:, :take])
        left -= take
    return out
