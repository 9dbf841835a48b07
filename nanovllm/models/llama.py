"""Llama-family decoder: Llama 2/3, Mistral, SmolLM2, and (through flags) Qwen2 and Qwen3.

One forward over a varlen batch: `input_ids [T]`, `positions [T]`, and a ForwardContext
describing which sequences the tokens belong to. Qwen2 adds q/k/v biases; Qwen3 adds a
per-head RMSNorm on q and k before RoPE. How each step runs (which kernels, what is fused)
is the layers' business: this file is the math.

Tensor parallelism is the layers' business too: the model passes full sizes, the parallel
layers take their rank's share (q/kv heads, MLP rows, vocabulary rows) from the group the
worker builds the model in, and attention runs on the rank's heads (`qkv_proj.num_heads`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.linear import GateUpLinear, LMHead, QKVLinear, RowParallelLinear, VocabEmbedding
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.norm_linear import RMSNormLinear, SiluMulLinear
from nanovllm.layers.rotary import build_cos_sin_cache


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def sliding_window_of(cfg) -> Optional[int]:
    """Mistral/Qwen sliding window, or None when the model attends to everything."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or (hasattr(cfg, "use_sliding_window") and not cfg.use_sliding_window):
        return None
    return int(window)


def layer_sliding_window(cfg, layer_idx: int) -> Optional[int]:
    """The window of layer `layer_idx`: the config's `layer_types` say which layers slide (Gemma's
    local layers; Qwen2/3's layers from max_window_layers on), else every layer (Mistral)."""
    window = sliding_window_of(cfg)
    layer_types = getattr(cfg, "layer_types", None)
    if window is None or (layer_types is not None and layer_types[layer_idx] != "sliding_attention"):
        return None
    return window


def attend_qkv(layer: nn.Module, qkv: torch.Tensor, positions, cos_sin_cache, ctx: ForwardContext) -> torch.Tensor:
    """An attention layer's work after its qkv projection: split [T, q + 2 kv] into heads, paged
    attention (RoPE, the optional q/k norms, the KV store), o_proj -> [T, hidden]. `layer` has
    q_size, kv_size, num_heads, num_kv_heads, head_dim, attn, q_norm, k_norm and o_proj."""
    q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
    q = q.view(-1, layer.num_heads, layer.head_dim)  # [T, H, D]
    k = k.view(-1, layer.num_kv_heads, layer.head_dim)  # [T, Hkv, D]
    v = v.view(-1, layer.num_kv_heads, layer.head_dim)
    out = layer.attn(q, k, v, positions, cos_sin_cache, ctx, layer.q_norm, layer.k_norm)  # [T, H, D]
    return layer.o_proj(out.reshape(-1, layer.q_size))


class DecoderAttention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, qk_norm: bool, layer_idx: int = 0) -> None:
        super().__init__()
        total_heads = cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(cfg)
        self.qkv_proj = QKVLinear(cfg.hidden_size, self.head_dim, total_heads, total_kv_heads, qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, cfg.hidden_size,
                                        bias=getattr(cfg, "o_bias", False))
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_sliding_window(cfg, layer_idx)
        )

    def forward(self, qkv, positions, cos_sin_cache, ctx: ForwardContext):
        """Attention from the qkv projection's output [T, q + 2 kv] (the decoder layer runs
        the projection together with its input norm) through o_proj."""
        return attend_qkv(self, qkv, positions, cos_sin_cache, ctx)


class DecoderMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported (only silu)")
        self.gate_up_proj = GateUpLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = SiluMulLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, gate_up):
        """down(silu(gate) * up) from the gate_up projection's output [T, 2 I] (the decoder
        layer runs the projection together with its norm) -> [T, hidden]."""
        return self.down_proj(gate_up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, qk_norm: bool, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, qkv_bias, qk_norm, layer_idx)
        self.mlp = DecoderMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # norm -> projection pairs (parameters stay under their checkpoint names above)
        self.qkv_in = RMSNormLinear(self.input_layernorm, self.self_attn.qkv_proj)
        self.gate_up_in = RMSNormLinear(self.post_attention_layernorm, self.mlp.gate_up_proj)

    def forward(self, hidden, residual, positions, cos_sin_cache, ctx):
        qkv, residual = self.qkv_in(hidden, residual)  # qkv_proj(RMSNorm(hidden + residual))
        hidden = self.self_attn(qkv, positions, cos_sin_cache, ctx)  # attention, o_proj
        gate_up, residual = self.gate_up_in(hidden, residual)  # gate_up_proj(RMSNorm(hidden + residual))
        return self.mlp(gate_up), residual  # down_proj(silu(gate) * up)


class DecoderModel(nn.Module):
    """Embedding, the decoder layers `make_layer(index)` builds (dense here, sparse MoE in
    qwen3_moe.py), final norm; one RoPE table for all of them."""

    def __init__(self, cfg, max_positions: int, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer(
            "cos_sin_cache", build_cos_sin_cache(cfg, head_dim_of(cfg), max_positions), persistent=False
        )

    def forward(self, input_ids, positions, ctx):
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, self.cos_sin_cache, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # Its layers shard themselves over the tensor-parallel group (layers/linear.py); a family
    # that does not say so is refused at tensor_parallel_size > 1 (worker/parallel.py).
    supports_tensor_parallel = True
    # checkpoint name fragment -> (packed parameter fragment, shard)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        qkv_bias = self.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        self.model = DecoderModel(cfg, max_positions, lambda i: DecoderLayer(cfg, qkv_bias, self.qk_norm, i))
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(hidden, indices)  # [N, vocab]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class MistralForCausalLM(LlamaForCausalLM):
    pass
