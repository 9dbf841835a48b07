"""Weight-only quantized formats: the layouts the Triton kernels read, packing from integer
codes, quantizers from float weights, and dequantization (the pure-torch truth).

A linear weight W `[N, K]` (nn.Linear layout) is kept as a `QuantizedWeight`:

  int8  codes q in [-127, 127] (GGUF Q8_0 / Q6_K: [-128, 127]),  W[n, k] = s[n, k // G] * q[n, k]
  int4  codes q in [0, 15], asymmetric,                          W[n, k] = s[n, k // G] * q[n, k] + b[n, k // G]
  fp8   e4m3 values f (torch.float8_e4m3fn),                     W[n, k] = s[n] * f[n, k]

G is the group size along K (`group_size`; G = K: one scale per output channel). int4's
offset b = -s * z for an integer zero point z (GPTQ, AWQ, our own quantizer) or a float
minimum (GGUF Q4_1 / Q4_K), so one form serves every source.

Why these packings. A decode step streams every weight byte once; the skinny GEMM gives each
thread one 16-byte vector of a weight row at a time (kernels/quant_gemv.py). int8 and int4
codes are packed into int32 words, 4 words = one 16-byte vector, "vector-planar":

  int4: vector v of a row = words 4v .. 4v+3 = 32 codes, k in [32v, 32v + 32);
        word i (0..3), nibble j (bits 4j..4j+3) holds k = 32v + 4j + i
  int8: vector v = 16 codes, k in [16v, 16v + 16); word i, byte j (bits 8j..8j+7) holds
        k = 16v + 4j + i

so unpacking nibble (byte) j of a thread's four words gives four consecutive k, and the
matching activations are one short contiguous load per plane j: the unpacked weights and x
share one register layout, no shuffles. A vector never straddles a group (G is a multiple
of 32 for int4, of 16 for int8), so one scale (and offset) per vector and row. K is padded
with zero codes to a multiple of the vector (and of G); the kernels mask x past K, so the
padding never contributes. fp8 keeps the natural `[N, K]` layout (what torch._scaled_mm
reads too); the hardware converts it.

Scales are fp16 where the group is smaller than the row (the sources' own precision: GPTQ,
AWQ and GGUF store fp16 scales; 2 bytes per group), fp32 per output channel. int4 offsets are
fp16 too: b = -s z rounds by at most ~0.4% of a quantization step, and 2 bytes per group
instead of 4 keep the metadata at 6% of the codes' bytes for G = 128.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

QTYPES = ("int8", "int4", "fp8")
INT4_VECTOR = 32  # codes per 16-byte vector (4 int32 words)
INT8_VECTOR = 16
WORDS_PER_VECTOR = 4
INT4_MAX = 15
INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
DEFAULT_INT4_GROUP = 128
INT4_GROUP_FALLBACKS = (128, 64, 32)  # for K not divisible by 128 (e.g. SmolLM2's 576 = 18 x 32)
MIN_SCALE = 1e-10  # all-zero rows / groups: any positive scale represents them exactly


def vector_size(qtype: str) -> int:
    """Codes per 16-byte vector of a packed row (int4 32, int8 16; fp8: one byte each)."""
    return {"int4": INT4_VECTOR, "int8": INT8_VECTOR, "fp8": 16}[qtype]


def padded_k(k: int, qtype: str, group_size: int) -> int:
    """K rounded up to whole vectors and whole groups (fp8 is never padded)."""
    if qtype == "fp8":
        return k
    step = max(vector_size(qtype), group_size)
    return -(-k // step) * step


@dataclass
class QuantizedWeight:
    """A linear weight `[N, K]` kept quantized; see the module docstring for the formats."""

    qtype: str  # "int8" | "int4" | "fp8"
    data: torch.Tensor  # int8/int4: int32 [N, K_pad / (4 | 8)] vector-planar words; fp8: [N, K] float8_e4m3fn
    scales: torch.Tensor  # [N, K_pad / G] (fp16 when grouped, fp32 per channel)
    biases: Optional[torch.Tensor]  # int4: [N, K_pad / G] fp16 (w = s * q + b); else None
    group_size: int  # G; equal to K_pad for one scale per output channel
    in_features: int  # K (logical, before padding)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def k_padded(self) -> int:
        return self.scales.shape[1] * self.group_size

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[1] == 1

    def nbytes(self) -> int:
        """Bytes of the tensors a GEMM streams (codes, scales, offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.biases) if t is not None)

    def to(self, device) -> "QuantizedWeight":
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, data=move(self.data), scales=move(self.scales), biases=move(self.biases))

    def validate(self) -> "QuantizedWeight":
        """Raise ValueError if the tensors do not describe one consistent weight."""
        if self.qtype not in QTYPES:
            raise ValueError(f"qtype {self.qtype!r} is not one of {QTYPES}")
        n, g = self.data.shape[0], self.group_size
        if self.scales.dim() != 2 or self.scales.shape[0] != n:
            raise ValueError(f"scales must be [N={n}, groups], got {tuple(self.scales.shape)}")
        k_pad = self.k_padded
        if self.qtype == "fp8":
            if self.data.dtype != FP8_DTYPE or self.scales.shape[1] != 1 or self.data.shape[1] != self.in_features:
                raise ValueError("fp8 weights are float8_e4m3fn [N, K] with one fp32 scale per row")
            return self
        vec = vector_size(self.qtype)
        per_word = 8 if self.qtype == "int4" else 4
        if g % vec or k_pad % vec or not 0 < self.in_features <= k_pad or k_pad - self.in_features >= max(vec, g):
            raise ValueError(f"{self.qtype}: group size {g} must be a multiple of {vec}; K {self.in_features} "
                             f"padded to {k_pad}")
        if self.data.dtype != torch.int32 or tuple(self.data.shape) != (n, k_pad // per_word):
            raise ValueError(f"{self.qtype} codes must be int32 [{n}, {k_pad // per_word}], got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")
        if (self.biases is None) != (self.qtype != "int4") or (
                self.biases is not None and self.biases.shape != self.scales.shape):
            raise ValueError("int4 needs offsets shaped like its scales; int8 has none")
        return self


# ----------------------------------------------------------------------------- packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes in [0, 15], K % 32 == 0 -> int32 [N, K / 8] vector-planar words."""
    n, k = codes.shape
    if k % INT4_VECTOR:
        raise ValueError(f"pack_int4 needs K a multiple of {INT4_VECTOR}, got {k}")
    q = codes.to(torch.int64).view(n, k // INT4_VECTOR, 8, WORDS_PER_VECTOR)  # [N, V, j, i]
    shifts = (4 * torch.arange(8, device=codes.device)).view(1, 1, 8, 1)
    words = (q << shifts).sum(dim=2)  # [N, V, i]: disjoint bits, sum == or
    return _to_int32(words).view(n, k // 8)


def unpack_int4(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 [N, K / 8] -> uint8 codes [N, K]."""
    n, kw = words.shape
    w = words.to(torch.int64).view(n, kw // WORDS_PER_VECTOR, 1, WORDS_PER_VECTOR) & 0xFFFFFFFF
    shifts = (4 * torch.arange(8, device=words.device)).view(1, 1, 8, 1)
    return ((w >> shifts) & 0xF).to(torch.uint8).reshape(n, kw * 8)  # [N, V, j, i] -> k = 32v + 4j + i


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [-128, 127], K % 16 == 0 -> int32 [N, K / 4] vector-planar words."""
    n, k = codes.shape
    if k % INT8_VECTOR:
        raise ValueError(f"pack_int8 needs K a multiple of {INT8_VECTOR}, got {k}")
    q = (codes.to(torch.int64) & 0xFF).view(n, k // INT8_VECTOR, 4, WORDS_PER_VECTOR)  # [N, V, j, i]
    shifts = (8 * torch.arange(4, device=codes.device)).view(1, 1, 4, 1)
    return _to_int32((q << shifts).sum(dim=2)).view(n, k // 4)


def unpack_int8(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int8: int32 [N, K / 4] -> int8 codes [N, K]."""
    n, kw = words.shape
    w = words.to(torch.int64).view(n, kw // WORDS_PER_VECTOR, 1, WORDS_PER_VECTOR) & 0xFFFFFFFF
    shifts = (8 * torch.arange(4, device=words.device)).view(1, 1, 4, 1)
    u = ((w >> shifts) & 0xFF).reshape(n, kw * 4)
    return (u - ((u & 0x80) << 1)).to(torch.int8)  # two's complement byte -> signed


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return (words64 - ((words64 & 0x80000000) << 1)).to(torch.int32)


def _pad_k(t: torch.Tensor, k_pad: int, value=0) -> torch.Tensor:
    k = t.shape[1]
    if k == k_pad:
        return t
    return torch.nn.functional.pad(t, (0, k_pad - k), value=value)


# ----------------------------------------------------------------------------- from codes


def int4_from_codes(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int,
                    in_features: Optional[int] = None) -> QuantizedWeight:
    """Pack int4 codes [N, K] (values 0..15) with per-group scales / offsets [N, K / G]
    (W = s * q + b) into the kernel layout, padding K as needed."""
    n, k = codes.shape
    k_pad = padded_k(k, "int4", group_size)
    groups = k_pad // group_size
    scales, biases = _pad_groups(scales, groups), _pad_groups(biases, groups)
    return QuantizedWeight("int4", pack_int4(_pad_k(codes, k_pad)), scales.to(torch.float16),
                           biases.to(torch.float16), group_size, in_features or k).validate()


def int8_from_codes(codes: torch.Tensor, scales: torch.Tensor, group_size: Optional[int] = None,
                    in_features: Optional[int] = None) -> QuantizedWeight:
    """Pack int8 codes [N, K] with scales [N] (per channel) or [N, K / G] into the kernel layout."""
    n, k = codes.shape
    if scales.dim() == 1 or group_size is None or group_size >= k:
        k_pad = padded_k(k, "int8", INT8_VECTOR)
        return QuantizedWeight("int8", pack_int8(_pad_k(codes, k_pad)), scales.reshape(n, 1).float(), None,
                               k_pad, in_features or k).validate()
    k_pad = padded_k(k, "int8", group_size)
    scales = _pad_groups(scales, k_pad // group_size).to(torch.float16)
    return QuantizedWeight("int8", pack_int8(_pad_k(codes, k_pad)), scales, None, group_size,
                           in_features or k).validate()


def _pad_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    if t.shape[1] == groups:
        return t
    if t.shape[1] > groups:
        raise ValueError(f"{t.shape[1]} groups of scales for {groups} groups of codes")
    return torch.nn.functional.pad(t, (0, groups - t.shape[1]), value=1.0)  # padding codes are 0 -> no effect


@dataclass
class QuantCodes:
    """Integer codes of a weight `[N, K]` in natural order, before packing: what the checkpoint
    readers (GPTQ, AWQ, GGUF) and the quantizers produce, and every backend packs its own way
    (GPU kernels: `to_weight`; CPU: torch's int4 / int8 packed formats).

    int4: codes in [0, 15], W = s * q + b per group; int8: codes in [-128, 127], W = s * q.
    The codes may be padded with zero columns past `in_features` to whole groups.
    """

    qtype: str  # "int4" | "int8"
    codes: torch.Tensor  # [N, K_pad] uint8 (int4) / int8
    scales: torch.Tensor  # [N, K_pad / G] float32 (may be negative: GGUF Q6_K)
    biases: Optional[torch.Tensor]  # int4: [N, K_pad / G] float32
    group_size: int
    in_features: Optional[int] = None  # K; None = the codes' width

    @property
    def k(self) -> int:
        return self.in_features or self.codes.shape[1]

    @property
    def padded(self) -> bool:
        return self.codes.shape[1] != self.k

    def to_weight(self) -> QuantizedWeight:
        """Pack into the GPU kernels' layout (scales rounded to fp16 where grouped)."""
        if self.qtype == "int4":
            return int4_from_codes(self.codes, self.scales, self.biases, self.group_size, self.k)
        per_channel = self.scales.shape[1] == 1
        return int8_from_codes(self.codes, self.scales.reshape(-1) if per_channel else self.scales,
                               None if per_channel else self.group_size, self.k)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        n, k_pad = self.codes.shape
        q = self.codes.float().view(n, self.scales.shape[1], -1)
        w = q * self.scales.float()[..., None]
        if self.biases is not None:
            w = w + self.biases.float()[..., None]
        return w.view(n, k_pad)[:, : self.k]

    def select_rows(self, index: torch.Tensor) -> "QuantCodes":
        """Rows in a new order (e.g. llama's Q/K permutation), the same op on every tensor."""
        pick = (lambda t: None if t is None else t[index])
        return replace(self, codes=pick(self.codes), scales=pick(self.scales), biases=pick(self.biases))

    def with_group_size(self, group_size: int) -> "QuantCodes":
        """int8 codes with smaller groups (each scale repeated: exact), e.g. Q8_0's 32 as 16."""
        if group_size == self.group_size:
            return self
        if self.qtype != "int8" or self.group_size % group_size:
            raise ValueError(f"cannot regroup {self.qtype} codes of group {self.group_size} into {group_size}")
        return replace(self, scales=self.scales.repeat_interleave(self.group_size // group_size, dim=1),
                       group_size=group_size)


def concat_rows(parts: list[QuantCodes]) -> QuantCodes:
    """Stack the row blocks of one packed projection (same format, group and K)."""
    first = parts[0]
    if any((p.qtype, p.group_size, p.codes.shape[1], p.k) != (first.qtype, first.group_size, first.codes.shape[1],
                                                              first.k) for p in parts):
        raise ValueError("row blocks of a packed projection disagree in format, group size or K")
    cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
    return QuantCodes(first.qtype, cat([p.codes for p in parts]), cat([p.scales for p in parts]),
                      cat([p.biases for p in parts]), first.group_size, first.in_features)


# ----------------------------------------------------------------------------- quantizers


def int4_group_size(k: int, requested: int = DEFAULT_INT4_GROUP) -> int:
    """`requested` if it divides K, else the largest of 128 / 64 / 32 that does (padding K to
    whole groups when none does)."""
    if k % requested == 0:
        return requested
    return next((g for g in INT4_GROUP_FALLBACKS if g <= requested and k % g == 0), requested)


@torch.no_grad()
def quantize_int8_codes(weight: torch.Tensor, group_size: Optional[int] = None) -> QuantCodes:
    """Symmetric int8 (round to nearest): one scale per output channel, or per group of
    `group_size` along K (K padded to whole groups)."""
    w = weight.float()
    n, k = w.shape
    if group_size is None or group_size >= k:
        scale = (w.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=MIN_SCALE)  # [N, 1]
        codes = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantCodes("int8", codes, scale, None, k, k)
    k_pad = -(-k // group_size) * group_size
    wg = _pad_k(w, k_pad).view(n, k_pad // group_size, group_size)  # [N, groups, G]
    scale = (wg.abs().amax(dim=2) / INT8_MAX).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
    codes = torch.round(wg / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).view(n, k_pad)
    return QuantCodes("int8", codes, scale, None, group_size, k)


@torch.no_grad()
def quantize_int4_codes(weight: torch.Tensor, group_size: int = DEFAULT_INT4_GROUP) -> QuantCodes:
    """Asymmetric int4 per group of `group_size` along K (`int4_group_size` picks a divisor of
    K; else K is padded), integer zero points (GPTQ/AWQ form W = s * (q - z), stored as s and
    b = -s * z); round to nearest."""
    n, k = weight.shape
    group_size = int4_group_size(k, group_size)
    k_pad = padded_k(k, "int4", group_size)
    w = _pad_k(weight.float(), k_pad).view(n, k_pad // group_size, group_size)  # [N, groups, G]
    lo = w.amin(dim=2).clamp(max=0.0)  # the range includes 0, so zero weights stay exact
    hi = w.amax(dim=2).clamp(min=0.0)
    # the scale is rounded to fp16 (what the kernels read) before the codes are chosen
    scale = ((hi - lo) / INT4_MAX).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.round(-lo / scale).clamp(0, INT4_MAX)  # [N, groups]
    codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, INT4_MAX).to(torch.uint8)
    return QuantCodes("int4", codes.view(n, k_pad), scale, -scale * zero, group_size, k)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8, one fp32 scale per output channel, packed for the kernels."""
    return quantize_int8_codes(weight).to_weight()


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_INT4_GROUP) -> QuantizedWeight:
    """`quantize_int4_codes`, packed for the kernels."""
    return quantize_int4_codes(weight, group_size).to_weight()


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    """e4m3 with one fp32 scale per output channel (amax maps to 448)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)  # [N]
    data = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedWeight("fp8", data, scale.view(-1, 1), None, weight.shape[1], weight.shape[1]).validate()


def quantize(weight: torch.Tensor, qtype: str, group_size: int = DEFAULT_INT4_GROUP) -> QuantizedWeight:
    """Quantize a float weight [N, K] to `qtype` ("int8", "int4", "fp8")."""
    if qtype == "int8":
        return quantize_int8(weight)
    if qtype == "int4":
        return quantize_int4(weight, group_size)
    if qtype == "fp8":
        return quantize_fp8(weight)
    raise ValueError(f"quantization {qtype!r} is not supported; use one of {QTYPES}")


# ----------------------------------------------------------------------------- reference


def codes_of(qw: QuantizedWeight) -> torch.Tensor:
    """The integer codes (int8 / int4) or e4m3 values (fp8) as float32 [N, K_pad]."""
    if qw.qtype == "int4":
        return unpack_int4(qw.data).float()
    if qw.qtype == "int8":
        return unpack_int8(qw.data).float()
    return qw.data.float()


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] a QuantizedWeight stands for (computed in fp32)."""
    q = codes_of(qw)  # [N, K_pad]
    n, k_pad = q.shape
    groups = qw.scales.shape[1]
    q = q.view(n, groups, k_pad // groups)
    w = q * qw.scales.float()[..., None]
    if qw.biases is not None:
        w = w + qw.biases.float()[..., None]
    return w.view(n, k_pad)[:, : qw.in_features].to(dtype)
