"""Scales of an fp8 KV cache: calibrated at start-up, one per layer, KV head and K / V, or given.

Calibration. Before the KV cache is sized, the worker runs one forward over a fixed batch of
random token ids (CALIBRATION_SEQS prompts of CALIBRATION_LEN tokens, seeded: the same
scales on every start) into a scratch cache of the model's dtype, then takes the largest
|K| and |V| each KV head stored, per layer. These are the projected, normalised and rotated
keys (times the Hadamard matrix where the fp8 store applies it, kv_quant.py) and the
projected values: exactly what the cache holds. A head's scale maps
HEADROOM x that maximum to e4m3's largest value (448), so a value up to twice anything seen
in calibration is still stored unclipped; e4m3's relative precision does not depend on the
scale, only its smallest values (below ~2^-9 of the scale's range) lose bits to the headroom.

Given scales. `kv_cache_scales=<float>` uses that scale for every layer and head (vLLM's
default is 1.0); `kv_cache_scales=<path>` reads a JSON file {"k": [[scale per KV head] per
layer], "v": [...]}, e.g. written by `save_scales` from a calibration on real text.
"""

from __future__ import annotations

import json
import logging
from typing import Union

import torch

from nanovllm.kernels import kv_quant
from nanovllm.worker import memory

logger = logging.getLogger(__name__)

CALIBRATION_SEQS = 2
CALIBRATION_LEN = 256  # tokens per calibration prompt: positions 0..255 (the first token's outliers included)
CALIBRATION_SEED = 0
HEADROOM = 2.0  # the calibrated maximum maps to 448 / HEADROOM


@torch.inference_mode()
def calibrate_amax(model, device: torch.device, dtype: torch.dtype, block_size: int, vocab_size: int,
                   num_seqs: int = CALIBRATION_SEQS, seq_len: int = CALIBRATION_LEN) -> list[tuple]:
    """Per attention layer, (max |K|, max |V|) per KV head [num_kv_heads] fp32, over the K/V that a
    forward of random prompts stores (computed in the model's dtype, no fp8 involved)."""
    lens = [seq_len] * num_seqs
    ctx, num_blocks = memory.prefill_context(lens, block_size, device)
    saved = memory.scratch_caches(model, num_blocks, block_size, dtype, device)  # kv_scale None: unquantized
    try:
        for a in model.attention_layers():
            a.kv_scale = None
        gen = torch.Generator().manual_seed(CALIBRATION_SEED)
        input_ids = torch.randint(0, vocab_size, (sum(lens),), generator=gen).to(device)
        model(input_ids, ctx.positions, ctx)
        # unused slots of the zeroed scratch cache add nothing to a maximum of |x|
        out = []
        for a in model.attention_layers():
            k = a.k_cache.float()  # [blocks, Hkv, block_size, D]
            if kv_quant.rotates_keys(a.head_dim, a.rotary_dim or 0):  # an fp8 store writes H k
                k = k @ kv_quant.hadamard(a.head_dim, k.device)
            out.append((k.abs().amax(dim=(0, 2, 3)), a.v_cache.float().abs().amax(dim=(0, 2, 3))))
        return out
    finally:
        memory.restore_caches(model, saved)


def scales_from_calibration(amax: list[tuple], headroom: float = HEADROOM) -> list[tuple]:
    return [(kv_quant.scales_from_amax(k, headroom), kv_quant.scales_from_amax(v, headroom)) for k, v in amax]


def load_scales(source: Union[float, str], model) -> list[tuple]:
    """Per layer (k_scale, v_scale) [num_kv_heads] from a float (every head) or a JSON file."""
    layers = model.attention_layers()
    if not isinstance(source, str):
        return [(torch.full((a.num_kv_heads,), float(source)), torch.full((a.num_kv_heads,), float(source)))
                for a in layers]
    try:
        with open(source) as f:
            data = json.load(f)
        ks, vs = data["k"], data["v"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"kv_cache_scales={source!r}: expected a JSON file {{\"k\": [[...]], \"v\": [[...]]}} "
                         f"with one list of per-KV-head scales per layer ({e})") from e
    if len(ks) != len(layers) or len(vs) != len(layers):
        raise ValueError(f"kv_cache_scales={source!r} has {len(ks)} / {len(vs)} layers of scales; the model has "
                         f"{len(layers)} attention layers")
    out = []
    for i, (a, k, v) in enumerate(zip(layers, ks, vs)):
        k, v = torch.tensor(k, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)
        if k.shape != (a.num_kv_heads,) or v.shape != (a.num_kv_heads,):
            raise ValueError(f"kv_cache_scales={source!r}: layer {i} needs {a.num_kv_heads} K and V scales, "
                             f"got {list(k.shape)} and {list(v.shape)}")
        if not (torch.isfinite(k).all() and torch.isfinite(v).all() and (k > 0).all() and (v > 0).all()):
            raise ValueError(f"kv_cache_scales={source!r}: layer {i} has a scale that is not a positive number")
        out.append((k, v))
    return out


def save_scales(path: str, model) -> None:
    """Write the model's current fp8 scales as the JSON file `kv_cache_scales=<path>` reads."""
    layers = model.attention_layers()
    data = {"k": [a.kv_scale[kv_quant.K_SCALE].tolist() for a in layers],
            "v": [a.kv_scale[kv_quant.V_SCALE].tolist() for a in layers]}
    with open(path, "w") as f:
        json.dump(data, f)


def apply_scales(model, scales: list[tuple], device: torch.device) -> None:
    """Give each attention layer its [4, num_kv_heads] kv_scale tensor (kernels/kv_quant.py)."""
    for a, (k, v) in zip(model.attention_layers(), scales):
        a.kv_scale = kv_quant.kv_scale_tensor(k, v).to(device)


def summary(model) -> str:
    k = torch.stack([a.kv_scale[kv_quant.K_SCALE].cpu() for a in model.attention_layers()])
    v = torch.stack([a.kv_scale[kv_quant.V_SCALE].cpu() for a in model.attention_layers()])
    return (f"K scales {k.min().item():.3g}..{k.max().item():.3g}, V scales {v.min().item():.3g}..{v.max().item():.3g} "
            f"over {k.shape[0]} layers x {k.shape[1]} KV heads")
