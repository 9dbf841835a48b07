"""Rotary position embedding: a precomputed cos/sin table shared by all layers.

Reads both config styles: transformers 5.x `rope_parameters` and 4.x top-level
`rope_theta` + `rope_scaling`. Supports plain, linear, llama3 and yarn scaling.
"""

from __future__ import annotations

import math

import torch

DEFAULT_ROPE_THETA = 10000.0


def rope_settings(hf_config) -> tuple[float, dict]:
    """(theta, scaling dict with a 'rope_type' key) from either config style."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or DEFAULT_ROPE_THETA
    merged.setdefault("rope_type", merged.pop("type", "default"))
    return float(theta), merged


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency remap: low frequencies / factor, high kept, smooth in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_cos_sin_cache(hf_config, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32 table: cat(cos, sin) of position * inv_freq."""
    theta, scaling = rope_settings(hf_config)
    partial = getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0
    rotary_dim = int(head_dim * partial)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    rope_type = scaling["rope_type"]
    attention_factor = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "yarn":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
        inv_freq = inv.double()
    else:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: default, linear, llama3, yarn")
    t = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # [max_positions, rotary_dim / 2]
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor).float()
