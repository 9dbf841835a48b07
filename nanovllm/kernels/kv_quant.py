"""FP8 KV cache format: e4m3 values with one scale per layer and KV head, and its torch reference.

Why fp8. At large batch a decode step reads the K/V of every running request: ~92% of the
bytes of a throughput run with Qwen3-0.6B. Stored as float8 e4m3 (1 byte) instead of bf16,
the cache holds twice the tokens and every step reads half the bytes.

Format. A cached value is `round_e4m3(clamp(x / scale, -448, 448))`, decoded as
`value * scale`; `scale` is per layer and KV head, separately for K and V (K is the rotated,
normalised key that attention reads). Rounding is to nearest, ties to even, and saturates at
e4m3's largest finite value (448) instead of overflowing. Attention never dequantizes the
cache in memory: a K scale is a scalar per (program, KV head), so it folds into the
softmax scale, and a V scale multiplies the output once.

Each attention layer holds its scales as one fp32 tensor `kv_scale [4, num_kv_heads]`: rows
K_SCALE, V_SCALE and their reciprocals (K_INV, V_INV), which the store multiplies with (the
reciprocal computed once, here, so that kernels and reference quantize alike).

Rotated keys. e4m3 keeps 3 mantissa bits: each stored value is off by up to 1/16 of itself.
A score q.k sums D such errors weighted by q; when q and k share a few large channels (they
do in Llama-style models) those channels carry nearly all of the error. Rotating both by
one orthogonal matrix leaves q.k unchanged, (Hq).(Hk) = q.k, and a normalised Hadamard
matrix H spreads every channel over all D of them, so no channel dominates the error. With
a fully rotary head (the RoPE + store kernel then holds the whole head) of at least
HADAMARD_MIN_DIM features, an fp8 store writes H k into the cache and rewrites q in place as
H q; attention is unchanged. On the bundled SmolLM2 this halves the perplexity cost of the
fp8 cache (1.5k tokens of tests/data/alice_chapter1.txt: +1.45% -> +0.69%). V is stored
as it is (its rounding costs ~0.1%).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value
FP8_MIN_SCALE = 1e-12  # a head whose calibration saw only zeros still gets a usable scale
K_SCALE, V_SCALE, K_INV, V_INV = 0, 1, 2, 3  # rows of a layer's kv_scale tensor
NUM_SCALE_ROWS = 4
HADAMARD_MIN_DIM = 32  # the Triton store multiplies half-heads (>= 16 features) on tensor cores


def rotates_keys(head_dim: int, rotary_dim: int) -> bool:
    """Whether an fp8 store of this head shape writes Hadamard-rotated keys (and rotates q)."""
    return rotary_dim == head_dim and head_dim >= HADAMARD_MIN_DIM and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=None)
def hadamard(n: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """[n, n] fp32 normalised Sylvester-Hadamard matrix H (symmetric, H @ H = I); n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(device)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def kv_scale_tensor(k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """[4, num_kv_heads] fp32: K scale, V scale and their reciprocals (the layout kernels read)."""
    k = k_scale.float().clamp_min(FP8_MIN_SCALE)
    v = v_scale.float().clamp_min(FP8_MIN_SCALE)
    return torch.stack([k, v, 1.0 / k, 1.0 / v]).contiguous()


def scales_from_amax(amax: torch.Tensor, headroom: float) -> torch.Tensor:
    """Scale that maps `amax * headroom` to the largest e4m3 value (per head)."""
    return (amax.float() * headroom / FP8_E4M3_MAX).clamp_min(FP8_MIN_SCALE)


def quantize(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x [..., num_kv_heads, head_dim] -> e4m3 of x * inv_scale (per head), saturated at +-448."""
    y = x.float() * inv_scale.float().view(-1, 1)  # [..., H, D]
    return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, head_dim: int = -2) -> torch.Tensor:
    """fp8 x with its KV-head dimension at `head_dim` -> fp32 x * scale (per head)."""
    shape = [1] * x.dim()
    shape[head_dim] = -1
    return x.float() * scale.float().view(shape)


def maybe_dequantize(x: torch.Tensor, kv_scale: Optional[torch.Tensor], row: int, head_dim: int = -2) -> torch.Tensor:
    """fp32 values of a cache slice: dequantized when it is fp8, upcast otherwise."""
    if x.dtype == FP8_DTYPE:
        if kv_scale is None:
            raise ValueError("an fp8 KV cache needs its kv_scale tensor [4, num_kv_heads]")
        return dequantize(x, kv_scale[row], head_dim)
    return x.float()


def check_kv_scale(k_cache: torch.Tensor, kv_scale: Optional[torch.Tensor]) -> bool:
    """Whether `k_cache` is fp8; if so, `kv_scale` must be its contiguous fp32 [4, num_kv_heads] scales."""
    if not is_fp8(k_cache):
        return False
    num_kv_heads = k_cache.shape[1]
    if (kv_scale is None or tuple(kv_scale.shape) != (NUM_SCALE_ROWS, num_kv_heads)
            or kv_scale.dtype != torch.float32 or not kv_scale.is_contiguous() or kv_scale.device != k_cache.device):
        got = None if kv_scale is None else (tuple(kv_scale.shape), kv_scale.dtype, str(kv_scale.device))
        raise ValueError(f"an fp8 KV cache needs kv_scale, a contiguous fp32 [{NUM_SCALE_ROWS}, {num_kv_heads}] "
                         f"tensor on the cache's device (kernels/kv_quant.py); got {got}")
    return True
