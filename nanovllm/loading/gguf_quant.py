"""GGUF quantized blocks -> `QuantCodes` (codes + per-group scales / offsets), so that GGUF
weights stay quantized in memory instead of being dequantized at load.

Block layouts follow llama.cpp's ggml-quants (and the `gguf` package's reference
`dequantize_blocks`, which this mirrors up to the final multiply):

  Q4_0  (32 codes, 18 B): d fp16, 16 B nibbles;   w = d (q - 8)       -> int4, s = d, b = -8 d
  Q4_1  (32 codes, 20 B): d, m fp16, 16 B;        w = d q + m         -> int4, s = d, b = m
  Q4_K  (256 codes, 144 B): d, dmin fp16, 12 B of 6-bit (sc, m) for 8 sub-blocks of 32, 128 B
                          nibbles;                w = d sc q - dmin m -> int4 per 32
  Q8_0  (32 codes, 34 B): d fp16, 32 int8;        w = d q             -> int8 per 32
  Q6_K  (256 codes, 210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales, d fp16;
                          w = d sc (q - 32), 16 sub-blocks of 16 -> int8 per 16

In every block, nibble codes of element e < 16 (Q4_0 / Q4_1) sit in the low half of byte e and
e >= 16 in the high half of byte e - 16.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from nanovllm.kernels.quant_formats import QuantCodes

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian bytes -> float32 [..., 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] codes (low halves first, then high halves)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(blocks: np.ndarray):
    d = _f16(blocks[:, :2])
    return "int4", _nibbles_32(blocks[:, 2:]), d, -8.0 * d, 32


def _q4_1(blocks: np.ndarray):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return "int4", _nibbles_32(blocks[:, 4:]), d, m, 32


def _q8_0(blocks: np.ndarray):
    return "int8", blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), None, 32


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per block (ggml get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(blocks: np.ndarray):
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])  # [n, 8] each
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(n * 8, 32)  # sub-block 2c: low nibbles of chunk c, 2c + 1: high
    scale = (d * sc.astype(np.float32)).reshape(-1, 1)
    offset = -(dmin * mn.astype(np.float32)).reshape(-1, 1)
    return "int4", codes, scale, offset, 32


def _q6_k(blocks: np.ndarray):
    n = blocks.shape[0]
    ql, qh = blocks[:, : QK_K // 2], blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16].view(np.int8)
    d = _f16(blocks[:, -2:])
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    scale = (d * scales.astype(np.float32)).reshape(-1, 1)  # [n * 16, 1]
    return "int8", q.reshape(n * 16, 16), scale, None, 16


_READERS = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q6_K: _q6_k,
}
KEPT_QUANTIZED = tuple(_READERS)


def read_quantized(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> Optional[QuantCodes]:
    """`raw` [rows, bytes per row] of a 2-D tensor of `shape` (torch order) -> QuantCodes in
    natural order, or None when this type is not kept quantized (the caller dequantizes)."""
    reader = _READERS.get(qtype)
    if reader is None or len(shape) != 2:
        return None
    rows, k = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(raw).reshape(-1, type_size)  # [rows * k / block, type_size]
    kind, codes, scale, offset, group = reader(blocks)
    codes = torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, k).copy())
    to_groups = (lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a).reshape(rows, k // group).copy()))
    return QuantCodes(kind, codes.to(torch.uint8 if kind == "int4" else torch.int8), to_groups(scale),
                      to_groups(offset), group)
