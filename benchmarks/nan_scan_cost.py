"""Cost of the NaN / Inf weight scan done at every load (nanovllm.loading.weights.FiniteCheck).

    python benchmarks/nan_scan_cost.py                                   # Qwen3-8B shape, bf16, on CUDA
    python benchmarks/nan_scan_cost.py --device cpu --num-layers 2 --layers-only     # a slice on CPU

Builds random tensors with the checkpoint's names and shapes (embedding, per-layer q/k/v/o,
gate/up/down, norms, head) from a config.json, on the device, then times the scan exactly as
load_weights runs it: one `aminmax` per tensor and one host sync at the end. Prints the time,
the bytes read, GB/s, and the scan's share of a device-to-device copy of the same bytes (the
least any load does after the data reached the device). A last run with a NaN planted in
one tensor checks that the scan names it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm.loading.weights import FiniteCheck  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "qwen3-8b", "config.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checkpoint_shapes(cfg: dict, num_layers: int, layers_only: bool = False) -> dict[str, tuple[int, ...]]:
    """HF checkpoint tensor names -> shapes of a Llama / Qwen2 / Qwen3 model."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    qk_norm = cfg.get("model_type") == "qwen3"
    shapes = {} if layers_only else {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        if qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
    if layers_only:
        return shapes
    shapes["model.norm.weight"] = (hidden,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scan(tensors: dict[str, torch.Tensor]) -> list[str]:
    check = FiniteCheck()
    for name, t in tensors.items():
        check.add(name, t, "bench")
    return check.bad_tensors()


def time_it(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() (one warm-up call first)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a config.json (default: Qwen3-8B's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the config (a slice, for CPU)")
    p.add_argument("--layers-only", action="store_true", help="leave out the embedding and the head (less memory)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    with open(args.config) as f:
        cfg = json.load(f)
    layers = args.num_layers or cfg["num_hidden_layers"]
    shapes = checkpoint_shapes(cfg, layers, args.layers_only)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen, device=device, dtype=dtype) for name, shape in shapes.items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    scan_s = time_it(lambda: scan(tensors), device, args.repeats)
    buffer = torch.empty(max(t.numel() for t in tensors.values()), device=device, dtype=dtype)
    copy_s = time_it(lambda: [buffer[: t.numel()].view_as(t).copy_(t) for t in tensors.values()], device,
                     args.repeats)
    assert scan(tensors) == [], "random weights flagged"
    victim = f"model.layers.{layers // 2}.mlp.down_proj.weight"
    tensors[victim].view(-1)[tensors[victim].numel() // 3] = float("nan")
    assert scan(tensors) == [f"bench: tensor {victim!r}"], "the planted NaN was not found"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {os.path.basename(os.path.dirname(os.path.abspath(args.config)))} shape, {layers} of "
          f"{cfg['num_hidden_layers']} layers{' only' if args.layers_only else ''}, {str(dtype).replace('torch.', '')}: {len(tensors)} tensors, "
          f"{nbytes / 1e9:.2f} GB")
    print(f"NaN/Inf scan  {scan_s * 1e3:9.2f} ms  {nbytes / scan_s / 1e9:8.1f} GB/s read")
    print(f"copy (d2d)    {copy_s * 1e3:9.2f} ms  {2 * nbytes / copy_s / 1e9:8.1f} GB/s read+write")
    print(f"scan / copy   {scan_s / copy_s:9.2f}x   (planted NaN in {victim}: found)")
    if layers != cfg["num_hidden_layers"] or args.layers_only:
        full = checkpoint_shapes(cfg, cfg["num_hidden_layers"])
        full_bytes = sum(torch.Size(s).numel() for s in full.values()) * tensors[victim].element_size()
        print(f"extrapolated to the whole model ({full_bytes / 1e9:.1f} GB): "
              f"{scan_s * full_bytes / nbytes:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
