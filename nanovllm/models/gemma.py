"""Gemma 2 and Gemma 3 (text) decoders.

Differences from Llama, all visible below:
- embeddings scaled by sqrt(hidden) (the scale rounded to the model's dtype, as HF does);
- RMSNorm scales by (1 + w) (`GemmaRMSNorm`), and every block is sandwiched: a norm before
  attention and the MLP (input / pre_feedforward) and one after each (post_attention /
  post_feedforward), before the residual add;
- GeGLU MLP: gelu_tanh(gate) * up;
- attention scale `query_pre_attn_scalar ** -0.5` (not head_dim), alternating local
  (sliding-window) and global layers (`layer_types`);
- Gemma 2: attention-logit and final-logit soft-capping (`cap * tanh(x / cap)`);
- Gemma 3: q/k RMSNorm (Gemma style) before RoPE, and per-layer-type RoPE: the local
  layers' base (`rope_local_base_freq`, 10k) differs from the global layers' (1M, maybe scaled).

Tensor parallelism as Llama's: the parallel layers take their rank's share of the full sizes
passed here; the final-logit soft-cap runs on rank 0's gathered logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanovllm.kernels.reference import soft_cap
from nanovllm.layers import ops
from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS
from nanovllm.layers.linear import GateUpLinear, LMHead, QKVLinear, RowParallelLinear, VocabEmbedding
from nanovllm.layers.norm import GemmaRMSNorm
from nanovllm.layers.rotary import SLIDING_ATTENTION, build_cos_sin_cache, rope_settings
from nanovllm.models.llama import LlamaForCausalLM, attend_qkv, head_dim_of, layer_sliding_window

GELU_TANH_ACTS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


class GemmaAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        total_heads = cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(cfg)
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVLinear(cfg.hidden_size, self.head_dim, total_heads, total_kv_heads, bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        scale = float(getattr(cfg, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale,
                                   layer_sliding_window(cfg, layer_idx), getattr(cfg, "attn_logit_softcapping", None))

    def forward(self, hidden, positions, cos_sin_cache, ctx: ForwardContext):
        return attend_qkv(self, self.qkv_proj(hidden), positions, cos_sin_cache, ctx)  # qkv: [T, q + 2 kv]


class GemmaMLP(nn.Module):
    """down(gelu_tanh(gate) * up)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")
        if act not in GELU_TANH_ACTS:
            raise ValueError(f"Gemma hidden_activation={act!r} is not supported (only {', '.join(GELU_TANH_ACTS)})")
        self.gate_up_proj = GateUpLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)
        self.kernel_options = DEFAULT_KERNEL_OPTIONS

    def forward(self, x):
        gate_up = self.gate_up_proj(x)  # [T, 2 I]
        return self.down_proj(ops.gelu_tanh_and_mul(gate_up, self.kernel_options))  # [T, hidden]


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.is_local = layer_sliding_window(cfg, layer_idx) is not None
        self.self_attn = GemmaAttention(cfg, layer_idx, qk_norm)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, hidden, residual, positions, cos_sin_cache, ctx):
        """(hidden, residual) -> (post-FFN-normed MLP output, residual before adding it)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)  # norm(hidden + residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, positions, cos_sin_cache, ctx))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, cfg, qk_norm: bool, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype (55.4256 -> 55.5 in bf16)
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i, qk_norm) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        head_dim = head_dim_of(cfg)
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(cfg, head_dim, max_positions), persistent=False)
        # Gemma 3: the local layers rotate with their own base; Gemma 2 shares one table
        self.local_rope = rope_settings(cfg, SLIDING_ATTENTION) != rope_settings(cfg)
        if self.local_rope:
            self.register_buffer("cos_sin_cache_local", build_cos_sin_cache(cfg, head_dim, max_positions,
                                                                           SLIDING_ATTENTION), persistent=False)

    def forward(self, input_ids, positions, ctx):
        hidden = self.embed_tokens(input_ids) * self.embed_scale.to(self.embed_tokens.weight.dtype)  # [T, hidden]
        residual = None
        for layer in self.layers:
            table = self.cos_sin_cache_local if self.local_rope and layer.is_local else self.cos_sin_cache
            hidden, residual = layer(hidden, residual, positions, table, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma2ForCausalLM(nn.Module):
    qk_norm = False
    supports_tensor_parallel = True  # heads, MLP rows and vocabulary split as Llama's (layers/linear.py)
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, cfg, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg, self.qk_norm, max_positions)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.final_logit_softcap: Optional[float] = getattr(cfg, "final_logit_softcapping", None)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.lm_head(hidden, indices)  # [N, vocab]; None on tensor-parallel ranks > 0
        return None if logits is None else soft_cap(logits, self.final_logit_softcap)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
