"""Linear layers that keep their weight quantized (int8, int4, fp8) and run fused
dequant-GEMM kernels: the replacement the worker swaps in for `Linear` modules when a model is
quantized at load (`quantization=...`) or its checkpoint is (GPTQ, AWQ, GGUF).

How a QuantizedLinear runs a call with M rows (`_path`):

  CUDA  M <= skinny_rows   kernels/quant_gemv.py (with the RMSNorm / SiLU-and-mul in front of
                           it folded in, as the bf16 skinny GEMM does)
        M <= dot_rows      kernels/quant_gemm.py tensor-core kernel (dequant in registers)
        larger             dequantize into a transient bf16 weight + cuBLAS; fp8 on sm_89+:
                           torch._scaled_mm with per-row activation scales
        (the worker's calibration times these per weight shape and sets the two limits)
  CPU   int4 / int8 codes through torch's packed weight-only matmuls (quantized_cpu.py);
        fp8 (no CPU kernel) and the LM head (those kernels round their output to bf16, too
        coarse for logits) as fbgemm fp16 of the dequantized values
  Triton off: dequantize + F.linear (the reference numerics)

Loading. The module keeps the checkpoint's shard structure (packed qkv / gate_up) and a
placeholder `weight` Parameter whose `weight_loader` accepts what the readers yield for a
shard: a float tensor (quantized here, round to nearest), `QuantCodes` (GGUF blocks) or a
`QuantizedLinearSource` (GPTQ / AWQ). Once every shard arrived, the codes are packed for the
device and the staging copies dropped, so no float copy of the whole model stays behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import quant_formats as qf
from nanovllm.layers import ops
from nanovllm.layers.linear import Linear, LMHead, WeightShapeError, check_shape
from nanovllm.layers.norm_linear import RMSNormLinear, SiluMulLinear
from nanovllm.layers.quantized_cpu import (INT4_CPU_GROUPS, INT4_CPU_N_MULTIPLE, INT8_CPU_K_MULTIPLE, CpuQuantWeight,
                                           cpu_quant_linear, cpu_quant_ops_available, pack_int4_cpu, pack_int8_cpu)

logger = logging.getLogger(__name__)

# Uncalibrated defaults (the worker's timing replaces them on CUDA): the skinny kernel pays one
# FMA per weight per row, so int4 (whose unpacking already fills the issue slots) hands over
# to the tensor cores sooner.
DEFAULT_SKINNY_ROWS = {"int8": 8, "fp8": 8, "int4": 4}
DEFAULT_DOT_ROWS = 256


@dataclass(frozen=True)
class LinearQuantSpec:
    """How one linear layer is kept."""

    qtype: str  # "int8" | "int4" | "fp8"
    group_size: Optional[int] = None  # int4: group along K (default 128, a divisor of K); int8: None = per channel

    def __post_init__(self) -> None:
        if self.qtype not in qf.QTYPES:
            raise ValueError(f"quantization {self.qtype!r} is not supported; use one of {qf.QTYPES}")


WeightSource = Union[torch.Tensor, qf.QuantCodes, "QuantizedLinearSource"]  # noqa: F821 (loading's type)


class QuantizedLinear(Linear):
    """y = x dequant(W)^T (+ b) for a weight kept as int8 / int4 / fp8 codes; takes the place
    of a `Linear` (packed shards, SiLU-mul input and LM-head row selection included)."""

    supports_gemv = False  # the bf16 skinny-GEMM calibration and dispatch leave it alone
    quantized = True

    def __init__(self, base: Linear, spec: LinearQuantSpec) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel_options = base.kernel_options
        self.gemv_rows = 0
        self.packed_fp16 = None
        self.bias = base.bias  # loads through the base's own loader (shards included)
        self.shard_offsets: dict = dict(getattr(base, "shard_offsets", None) or {None: (0, base.out_features)})
        self.silu_input = isinstance(base, SiluMulLinear)  # x = [gate | up]
        self.lm_head = isinstance(base, LMHead)
        device, dtype = base.weight.device, base.weight.dtype
        self.weight = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load_weight
        self.weight.accepts_codes = True  # loading hands it checkpoint codes as they are (weights.py)
        if hasattr(base.weight, "expected_shards"):  # e.g. GPT-2's fused c_attn, split by the model's remap
            self.weight.expected_shards = base.weight.expected_shards
        self.qweight: Optional[qf.QuantizedWeight] = None  # CUDA (and the torch reference) format
        self.cpu_weight: Optional[CpuQuantWeight] = None  # CPU packed format
        self.register_buffer("input_perm", None, persistent=False)  # GPTQ act-order: x columns in this order
        self.skinny_rows = DEFAULT_SKINNY_ROWS[spec.qtype]
        self.dot_rows = DEFAULT_DOT_ROWS
        self._staged: dict = {}

    # ------------------------------------------------------------------ loading
    def load_weight(self, param: nn.Parameter, loaded: WeightSource, shard=None, name: str = "") -> None:
        if shard not in self.shard_offsets:
            raise WeightShapeError(f"tensor {name!r}: unknown shard {shard!r} of {type(self).__name__}")
        if self.qweight is not None or self.cpu_weight is not None or self.packed_fp16 is not None:
            raise WeightShapeError(f"tensor {name!r}: this layer's weight is already loaded")
        _, rows = self.shard_offsets[shard]
        check_shape(name, (rows, self.in_features), _source_shape(loaded))
        self._staged[shard] = loaded
        if len(self._staged) == len(self.shard_offsets):
            self._finalize(name)

    @torch.no_grad()
    def _finalize(self, name: str) -> None:
        device = self.weight.device
        parts = [self._staged[s] for s in self.shard_offsets]  # row blocks in order
        self._staged = {}
        perms = [getattr(p, "input_perm", None) for p in parts]
        if perms[0] is not None or any(p is not None for p in perms):
            if any(p is None or not torch.equal(p, perms[0]) for p in perms):
                raise WeightShapeError(f"tensor {name!r}: the packed projections' GPTQ act-order permutations differ")
            self.input_perm = perms[0].to(device)
        if self.spec.qtype == "fp8":
            weights = [qf.quantize_fp8(_float_rows(p, device)) for p in parts]
            qw = weights[0] if len(weights) == 1 else qf.QuantizedWeight(
                "fp8", torch.cat([w.data for w in weights]), torch.cat([w.scales for w in weights]), None,
                self.in_features, self.in_features)
            self._set_fp8(qw, device)
            return
        codes = qf.concat_rows([_to_spec(p, self.spec, device) for p in parts])
        if device.type == "cpu" and not self.kernel_options.gemv_on_cpu:
            self._set_cpu(codes)
        else:  # CUDA, or the CPU test hook that runs the Triton kernels in the interpreter
            self._set_qweight(codes.to_weight())

    def _set_qweight(self, qw: qf.QuantizedWeight) -> None:
        self.qweight = qw.validate()
        # buffers, so that memory accounting and .to() see them
        self.register_buffer("qdata", qw.data, persistent=False)
        self.register_buffer("qscales", qw.scales, persistent=False)
        if qw.biases is not None:
            self.register_buffer("qbiases", qw.biases, persistent=False)

    def _set_fp8(self, qw: qf.QuantizedWeight, device: torch.device) -> None:
        if device.type != "cpu" or self.kernel_options.gemv_on_cpu:
            self._set_qweight(qw)
            return
        # no fp8 CPU kernel: fbgemm fp16 of the e4m3 values (exact in fp16) times the row scales
        self._pack_fp16(qf.dequantize(qw))

    def _set_cpu(self, codes: qf.QuantCodes) -> None:
        if self.lm_head:
            # torch's int kernels return bf16: logits rounded to 8 bits flip close greedy choices
            # (the bundled model's chat answer), so the head runs fbgemm fp16 with fp32 output
            self._pack_fp16(codes.dequantize())
            return
        usable_int4 = (codes.qtype == "int4" and codes.group_size in INT4_CPU_GROUPS and not codes.padded
                       and self.out_features % INT4_CPU_N_MULTIPLE == 0)
        usable_int8 = self.in_features % INT8_CPU_K_MULTIPLE == 0  # other K crash torch's kernel
        if cpu_quant_ops_available() and (usable_int4 or usable_int8):
            self.cpu_weight = pack_int4_cpu(codes) if usable_int4 else pack_int8_cpu(codes)
            for i, t in enumerate(_cpu_tensors(self.cpu_weight)):
                self.register_buffer(f"qcpu{i}", t, persistent=False)
            return
        self._pack_fp16(codes.dequantize())  # shapes torch's int4 kernel refuses, or no int kernels

    def _pack_fp16(self, weight: torch.Tensor) -> None:
        bias = None if self.bias is None else self.bias.detach().float()
        self.packed_fp16 = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)

    def pack_fp16_for_cpu(self) -> None:
        """Nothing to do: the layer packs its own CPU format when its weight is loaded."""

    @property
    def loaded(self) -> bool:
        return self.qweight is not None or self.cpu_weight is not None or self.packed_fp16 is not None

    # ------------------------------------------------------------------ running
    def forward(self, x: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.lm_head and indices is not None:
            x = x[indices]  # [num_selected, hidden]
        flat = x.dim() == 2  # the decoder's [T, K]: no reshapes (each is an op at CPU batch-1 decode)
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        if self.silu_input:
            if self._path(x2) == "skinny" and self._fusable(x2):
                out = self._skinny(x2, prologue="silu")
                if out is not None:
                    return out if flat else out.view(*x.shape[:-1], self.out_features)
            x2 = ops.silu_and_mul(x2, self.kernel_options)
        out = self._gemm(x2)
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def fused_rms_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor], norm) -> Optional[tuple]:
        """(projection, new residual) with the RMSNorm in the skinny kernel, or None when this
        call runs the two separately (RMSNormLinear's hook)."""
        w = norm.weight
        if not (self._path(x) == "skinny" and self._fusable(x) and w.dtype == x.dtype and w.stride(0) == 1
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                          and residual.stride(-1) == 1))):
            return None
        return self._skinny(x, prologue="norm", residual=residual, norm=norm)

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.kernel_options.fuse_gemv_prologues and x.dim() == 2 and x.stride(-1) == 1
                and self.input_perm is None)

    def _path(self, x: torch.Tensor) -> str:
        if self.qweight is None:
            return "cpu"
        if not ((x.is_cuda or self.kernel_options.gemv_on_cpu) and self.kernel_options.triton):
            return "torch"
        m = x.shape[0]
        if m <= self.skinny_rows:
            return "skinny"
        return "dot" if m <= self.dot_rows else "large"

    def _skinny(self, x: torch.Tensor, prologue: str, residual=None, norm=None):
        from nanovllm.kernels import quant_gemv

        pdl = self.kernel_options.pdl
        try:
            if prologue == "norm":
                return quant_gemv.quant_rms_norm_skinny_gemm(x, residual, norm.weight, norm.eps, self.qweight,
                                                             self.bias, pdl=pdl)
            if prologue == "silu":
                return quant_gemv.quant_silu_mul_skinny_gemm(x, self.qweight, self.bias, pdl=pdl)
            return quant_gemv.quant_skinny_gemm(x, self.qweight, self.bias, pdl=pdl)
        except quant_gemv.NotTunedError as e:  # first call of a shape inside a graph capture
            logger.warning("%s; this graph dequantizes for it instead", e)
            return None

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (after any prologue) -> [M, N]."""
        if self.input_perm is not None:
            x = x.index_select(1, self.input_perm)
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        path = self._path(x)
        if path == "cpu":
            if self.cpu_weight is not None:
                return cpu_quant_linear(x, self.cpu_weight, self.bias)
            return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed_fp16).to(x.dtype)  # fp32 only
        if path == "torch":
            return F.linear(x, qf.dequantize(self.qweight, x.dtype), self.bias)
        from nanovllm.kernels import quant_gemm

        if path == "skinny":
            out = self._skinny(x, prologue="none")
            if out is not None:
                return out
            path = "large"
        if path == "dot":
            try:
                return quant_gemm.quant_dot_gemm(x, self.qweight, self.bias, pdl=self.kernel_options.pdl)
            except quant_gemm.NotTunedError as e:
                logger.warning("%s; this graph dequantizes for it instead", e)
        return quant_gemm.large_m_linear(x, self.qweight, self.bias)

    def set_row_limits(self, skinny_rows: int, dot_rows: int) -> None:
        """Row counts up to which the skinny and the tensor-core kernels serve (calibration)."""
        self.skinny_rows, self.dot_rows = max(0, int(skinny_rows)), max(0, int(dot_rows))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.spec.qtype}"
                f"{'' if self.spec.group_size is None else f' g{self.spec.group_size}'}")


# ----------------------------------------------------------------------------- conversions


def is_codes(loaded) -> bool:
    """Whether a checkpoint value is quantized codes (QuantCodes, or a QuantizedLinearSource
    wrapping them) rather than a tensor (torch, or a lazy safetensors one)."""
    return isinstance(loaded, qf.QuantCodes) or isinstance(getattr(loaded, "codes", None), qf.QuantCodes)


def as_codes(loaded) -> qf.QuantCodes:
    """The QuantCodes of a checkpoint value (a QuantizedLinearSource wraps them)."""
    return loaded if isinstance(loaded, qf.QuantCodes) else loaded.codes


def _source_shape(loaded) -> tuple:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    codes = as_codes(loaded)
    return (codes.codes.shape[0], codes.k)


def _float_rows(loaded, device) -> torch.Tensor:
    if isinstance(loaded, torch.Tensor):
        return loaded.to(device)
    return as_codes(loaded).dequantize().to(device)


def _to_spec(loaded, spec: LinearQuantSpec, device) -> qf.QuantCodes:
    """A shard's weight as codes of this layer's format: kept when the checkpoint's codes
    already are (GGUF, GPTQ, AWQ), regrouped when exact (int8), else requantized from float."""
    codes = None if isinstance(loaded, torch.Tensor) else as_codes(loaded)
    if codes is not None and codes.qtype == spec.qtype:
        if spec.qtype == "int4" and (spec.group_size is None or codes.group_size == spec.group_size):
            return _to_device(codes, device)
        if spec.qtype == "int8":
            if spec.group_size is None and codes.scales.shape[1] == 1:
                return _to_device(codes, device)
            if spec.group_size is not None and codes.group_size % spec.group_size == 0:
                return _to_device(codes.with_group_size(spec.group_size), device)
    w = _float_rows(loaded, device)
    if spec.qtype == "int4":
        return qf.quantize_int4_codes(w, spec.group_size or qf.DEFAULT_INT4_GROUP)
    return qf.quantize_int8_codes(w, spec.group_size)


def _to_device(codes: qf.QuantCodes, device) -> qf.QuantCodes:
    move = (lambda t: None if t is None else t.to(device))
    return qf.QuantCodes(codes.qtype, move(codes.codes), move(codes.scales), move(codes.biases), codes.group_size,
                         codes.in_features)


def _cpu_tensors(w: CpuQuantWeight) -> list[torch.Tensor]:
    return [t for t in vars(w).values() if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------- model level


def quantize_modules(model: nn.Module, specs: Mapping[str, LinearQuantSpec]) -> dict[str, QuantizedLinear]:
    """Swap each named Linear of `model` for a QuantizedLinear of its spec (weights not loaded
    yet); the RMSNormLinear wrappers that ran an old module run the new one. Returns the new
    modules by name."""
    modules = dict(model.named_modules())
    params = list(model.named_parameters(remove_duplicate=False))
    swapped: dict[int, QuantizedLinear] = {}
    out = {}
    for name, spec in specs.items():
        old = modules.get(name)
        if not isinstance(old, Linear):
            raise ValueError(f"cannot quantize {name!r}: not a linear layer of {type(model).__name__}")
        new = QuantizedLinear(old, spec)
        # a weight tied to another parameter (the LM head to the embedding): loading copies that
        # tensor into this layer too (loading/weights.py)
        tied = [n for n, p in params if p is old.weight and n != f"{name}.weight"]
        if tied:
            new.weight.tied_to = tied[0]
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        swapped[id(old)] = new
        out[name] = new
    for module in model.modules():
        if isinstance(module, RMSNormLinear) and id(module.linear) in swapped:
            module.rewire(swapped[id(module.linear)])
    return out


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters (each tied tensor once) plus the
    quantized layers' packed codes, scales and offsets."""
    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    for module in quantized_modules(model).values():
        for t in module.buffers(recurse=False):
            seen[id(t)] = t.numel() * t.element_size()
        if module.packed_fp16 is not None:
            seen[id(module)] = 2 * module.in_features * module.out_features
    return sum(seen.values())


def unquantized_weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What the same weights take in `dtype` (the memory report's comparison)."""
    quant = quantized_modules(model)
    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    tied = getattr(model, "tie_word_embeddings", False)
    for name, module in quant.items():
        if tied and module.lm_head:  # unquantized, the head is the embedding table (counted already)
            seen.pop(id(module.weight), None)
            continue
        seen[id(module.weight)] = module.in_features * module.out_features * torch.finfo(dtype).bits // 8
    return sum(seen.values())


def describe_quantization(model: nn.Module) -> str:
    """e.g. "int4 g128: 252 layers" or "int4 g32: 210 layers, int8 g32: 1 layer"; "" when none."""
    counts: dict[str, int] = {}
    for module in quantized_modules(model).values():
        spec = module.spec
        key = spec.qtype + ("" if spec.group_size is None else f" g{spec.group_size}")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}: {n} layer{'s' if n > 1 else ''}" for k, n in sorted(counts.items()))
