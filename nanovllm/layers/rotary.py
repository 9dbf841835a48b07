"""Rotary position embedding: a precomputed cos/sin table shared by all layers.

Reads both config styles: transformers 5.x `rope_parameters` and 4.x top-level
`rope_theta` + `rope_scaling`, and 5.x's per-layer-type form (Gemma 3: `{"sliding_attention":
{...}, "full_attention": {...}}`, one table per layer type). Supports plain, linear, llama3,
yarn and longrope (Phi-3) scaling.

Longrope has two frequency sets: the short factors while a sequence fits the pretraining
length (`original_max_position_embeddings`), the long ones once it is longer. Its table holds
both, short rows first (`[2 * max_positions, rotary_dim]`); the model offsets the positions of
a sequence longer than that length by `max_positions` (`longrope_positions`). As in HF, a whole
prefill longer than the pretraining length uses the long factors; keys cached while a
sequence was still short keep their short-factor rotation (HF recomputes them, vLLM does not).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

DEFAULT_ROPE_THETA = 10000.0
FULL_ATTENTION = "full_attention"  # HF's layer_types entries
SLIDING_ATTENTION = "sliding_attention"


def rope_settings(hf_config, layer_type: Optional[str] = None) -> tuple[float, dict]:
    """(theta, scaling dict with a 'rope_type' key) from either config style; `layer_type`
    picks the entry of a per-layer-type `rope_parameters` (the full-attention one by default)."""
    params = _of_layer_type(getattr(hf_config, "rope_parameters", None), layer_type)
    scaling = _of_layer_type(getattr(hf_config, "rope_scaling", None), layer_type)
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or DEFAULT_ROPE_THETA
    merged.setdefault("rope_type", merged.pop("type", "default"))
    if merged["rope_type"] == "su":  # Phi-3's early name for longrope
        merged["rope_type"] = "longrope"
    return float(theta), merged


def _of_layer_type(params: Optional[dict], layer_type: Optional[str]) -> dict:
    params = dict(params or {})
    if any(isinstance(v, dict) for v in params.values()):  # {layer type: parameters}
        params = dict(params.get(layer_type or FULL_ATTENTION) or {})
    return params


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


def build_cos_sin_cache(hf_config, head_dim: int, max_positions: int, layer_type: Optional[str] = None) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32 table: cat(cos, sin) of position * inv_freq (longrope:
    [2 * max_positions, rotary_dim], short-factor rows then long-factor rows)."""
    theta, scaling = rope_settings(hf_config, layer_type)
    partial = scaling.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0
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

        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu", **kwargs)
        inv_freq = inv.double()
    elif rope_type == "longrope":
        short, long, attention_factor = _longrope(hf_config, scaling, inv_freq)
        return torch.cat([_table(short, max_positions, attention_factor), _table(long, max_positions, attention_factor)])
    else:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                         "supported: default, linear, llama3, yarn, longrope")
    return _table(inv_freq, max_positions, attention_factor)


def _table(inv_freq: torch.Tensor, max_positions: int, attention_factor: float) -> torch.Tensor:
    t = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # [max_positions, rotary_dim / 2]
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor).float()


def _longrope(hf_config, scaling: dict, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(short inv_freq, long inv_freq, attention factor) of Phi-3's longrope (HF's formulas)."""
    original = longrope_original_length(hf_config)
    factor = scaling.get("factor") or hf_config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = {}
    for kind in ("short_factor", "long_factor"):
        values = torch.tensor(scaling[kind], dtype=torch.float64)
        if values.shape != inv_freq.shape:
            raise ValueError(f"longrope {kind} has {values.numel()} entries; the rotary dim needs {inv_freq.numel()}")
        factors[kind] = inv_freq / values
    return factors["short_factor"], factors["long_factor"], float(attention_factor)


def longrope_original_length(hf_config, layer_type: Optional[str] = None) -> Optional[int]:
    """The pretraining length after which longrope switches to its long factors; None without longrope."""
    _, scaling = rope_settings(hf_config, layer_type)
    if scaling["rope_type"] != "longrope":
        return None
    return int(scaling.get("original_max_position_embeddings")
               or getattr(hf_config, "original_max_position_embeddings", None) or hf_config.max_position_embeddings)


def longrope_positions(positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       original_length: int, max_positions: int) -> torch.Tensor:
    """Row of each token in a longrope table: its position, plus max_positions (the long rows)
    when its sequence is longer than `original_length` after this step. Sync-free (CUDA graphs:
    padding tokens past the batch's end are clamped to the last sequence)."""
    token = torch.arange(positions.shape[0], device=positions.device)  # [T]
    seq = torch.searchsorted(query_start_loc[1:], token, right=True).clamp_(max=seq_lens.shape[0] - 1)  # [T]
    long = seq_lens[seq] > original_length  # [T]
    return positions + long.to(positions.dtype) * max_positions
