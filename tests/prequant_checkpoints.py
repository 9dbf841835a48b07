"""Tiny pre-quantized checkpoints (GPTQ v1 / v2, AWQ gemm) written from a float tiny model.

The writers follow AutoGPTQ's and AutoAWQ's packing loops directly (an independent
implementation of what `nanovllm.loading.gptq_awq` reads): round-to-nearest int4 per group
with integer zero points, then the on-disk layouts. `expected` holds, per linear, the float
weight the checkpoint stands for, to compare the loader's result with.

Imported by tests as `from prequant_checkpoints import ...` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
import os

import torch

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def rtn_int4(w: torch.Tensor, g_idx: torch.Tensor, groups: int):
    """Round-to-nearest asymmetric int4 with groups given per input feature (g_idx [K]).
    Returns codes [N, K] (0..15), scales [groups, N], zeros [groups, N] (integers)."""
    n, k = w.shape
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n)
    codes = torch.empty(n, k, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]
        lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        z = torch.round(-lo / s).clamp(0, 15)
        codes[:, cols] = (torch.round(wg / s[:, None]) + z[:, None]).clamp(0, 15).long()
        scales[g], zeros[g] = s, z
    return codes, scales, zeros


def pack_gptq(codes, scales, zeros, g_idx, v1: bool):
    n, k = codes.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):  # AutoGPTQ: qweight[row] |= intweight[row * 8 + i] << (4 * i)
        qweight |= codes.t()[i::8] << (4 * i)
    stored = zeros.long() - (1 if v1 else 0)
    stored = stored & 0xF  # v1 stores z - 1 in 4 bits
    qzeros = torch.zeros(zeros.shape[0], n // 8, dtype=torch.int64)
    for i in range(8):
        qzeros |= stored[:, i::8] << (4 * i)
    to32 = lambda t: (t - ((t & 0x80000000) << 1)).to(torch.int32)  # noqa: E731
    return {"qweight": to32(qweight), "qzeros": to32(qzeros), "scales": scales.half(), "g_idx": g_idx.to(torch.int32)}


def pack_awq(codes, scales, zeros):
    n, k = codes.shape
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    qzeros = torch.zeros(zeros.shape[0], n // 8, dtype=torch.int64)
    for i in range(8):  # AutoAWQ gemm: column block c, nibble i = channel 8c + order[i]
        qweight |= codes.t()[:, AWQ_ORDER[i]::8] << (4 * i)
        qzeros |= zeros.long()[:, AWQ_ORDER[i]::8] << (4 * i)
    to32 = lambda t: (t - ((t & 0x80000000) << 1)).to(torch.int32)  # noqa: E731
    return {"qweight": to32(qweight), "qzeros": to32(qzeros), "scales": scales.half()}


def write_prequantized(float_dir: str, out_dir: str, method: str, group_size: int = 32, act_order: bool = False,
                       v1: bool = True, seed: int = 0) -> dict:
    """Quantize every decoder linear of the float checkpoint in `float_dir` and write a
    GPTQ ("gptq") or AWQ ("awq") checkpoint to `out_dir`. Returns {linear prefix: expected
    float weight [N, K]} (the dequantization of what was written)."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for name in sorted(os.listdir(float_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(float_dir, name)))
    gen = torch.Generator().manual_seed(seed)
    out, expected = {}, {}
    for name, t in tensors.items():
        prefix = name[: -len(".weight")]
        if not (name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEARS):
            out[name] = t
            continue
        w = t.float()
        n, k = w.shape
        groups = k // group_size
        g_idx = torch.arange(k) // group_size
        if act_order:  # one permutation per input, as GPTQ's Hessian order is: q/k/v and gate/up share theirs
            layer, proj = prefix.rsplit(".", 1)
            shared_input = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
            key = f"{layer.split('.', 1)[0]}.{layer}.{shared_input.get(proj, proj)}"
            perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + sum(map(ord, key))))
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perm] = torch.arange(k) // group_size
        codes, scales, zeros = rtn_int4(w, g_idx, groups)
        expected[prefix] = (codes - zeros.t()[:, g_idx]) * scales.t()[:, g_idx]
        parts = pack_gptq(codes, scales, zeros, g_idx, v1) if method == "gptq" else pack_awq(codes, scales, zeros)
        for suffix, v in parts.items():
            out[f"{prefix}.{suffix}"] = v.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(float_dir, "config.json")) as f:
        config = json.load(f)
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": False,
              "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True}
    config["quantization_config"] = qc
    config["torch_dtype"] = "float16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return expected


def export_gguf_as_hf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.float16) -> str:
    """The GGUF's weights dequantized into an HF directory (config.json + model.safetensors in
    `dtype`): a 16-bit checkpoint of the bundled model for the quantize-at-load paths."""
    from safetensors.torch import save_file

    from nanovllm.loading.gguf_loader import read_gguf_checkpoint

    ckpt = read_gguf_checkpoint(gguf_path)
    os.makedirs(out_dir, exist_ok=True)
    config = ckpt.hf_config
    config.dtype = dtype
    config.save_pretrained(out_dir)
    save_file({name: t.to(dtype).contiguous() for name, t in ckpt.iter_tensors()},
              os.path.join(out_dir, "model.safetensors"))
    return out_dir


def write_reference(src: str, dst: str, transform) -> str:
    """Copy a float checkpoint with every decoder linear's weight replaced by transform(W)."""
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, name)))
        elif name.endswith(".json"):
            shutil.copy(os.path.join(src, name), dst)
    out = {}
    for name, t in tensors.items():
        stem = name.rsplit(".", 2)
        out[name] = transform(name, t) if len(stem) == 3 and stem[1] in LINEARS and stem[2] == "weight" else t
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst
