"""Sparse mixture-of-experts decoders: Qwen3-MoE here, Mixtral (mixtral.py) by its names.

The Llama decoder with the MLP of (most) layers replaced by a router and E experts, of which
each token uses top_k (`layers/moe.py`). Qwen3-MoE keeps Qwen3's q/k norm, renormalises the
top_k weights when `norm_topk_prob` is set, and may keep dense MLP layers (`mlp_only_layers`,
`decoder_sparse_step`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.linear import LMHead
from nanovllm.layers.moe import DOWN, GATE, UP, SparseMoeBlock, expert_checkpoint_tensor
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.norm_linear import RMSNormLinear
from nanovllm.models.llama import DecoderAttention, DecoderMLP, DecoderModel, LlamaForCausalLM


class MoEDecoderLayer(nn.Module):
    def __init__(self, cfg, arch: "Qwen3MoeForCausalLM", layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, arch.qkv_bias or bool(getattr(cfg, "attention_bias", False)),
                                          arch.qk_norm, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_in = RMSNormLinear(self.input_layernorm, self.self_attn.qkv_proj)
        self.sparse = arch.is_sparse_layer(cfg, layer_idx)
        if self.sparse:
            moe = SparseMoeBlock(cfg.hidden_size, arch.num_experts(cfg), arch.moe_intermediate_size(cfg),
                                 cfg.num_experts_per_tok, arch.renormalize(cfg))
            self.moe_attribute = arch.moe_attribute  # its checkpoint name: "mlp" or "block_sparse_moe"
            setattr(self, arch.moe_attribute, moe)
        else:
            self.mlp = DecoderMLP(cfg)
            self.gate_up_in = RMSNormLinear(self.post_attention_layernorm, self.mlp.gate_up_proj)

    def forward(self, hidden, residual, positions, cos_sin_cache, ctx):
        qkv, residual = self.qkv_in(hidden, residual)  # qkv_proj(RMSNorm(hidden + residual))
        hidden = self.self_attn(qkv, positions, cos_sin_cache, ctx)
        if self.sparse:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return getattr(self, self.moe_attribute)(hidden), residual  # sum of the top_k experts, weighted
        gate_up, residual = self.gate_up_in(hidden, residual)
        return self.mlp(gate_up), residual


class Qwen3MoeForCausalLM(nn.Module):
    supports_tensor_parallel = True  # attention as Llama's; each expert's intermediate size split (layers/moe.py)
    qkv_bias = False
    qk_norm = True
    moe_attribute = "mlp"  # checkpoint name of a sparse layer's MoE block
    expert_projections = {"gate_proj": GATE, "up_proj": UP, "down_proj": DOWN}
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping  # attention (and dense MLP layers)

    def __init__(self, cfg, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions, lambda i: MoEDecoderLayer(cfg, self, i))
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- the architecture's choices (Mixtral overrides them)
    @staticmethod
    def num_experts(cfg) -> int:
        return cfg.num_experts

    @staticmethod
    def moe_intermediate_size(cfg) -> int:
        return cfg.moe_intermediate_size

    @staticmethod
    def renormalize(cfg) -> bool:
        return bool(getattr(cfg, "norm_topk_prob", False))

    @staticmethod
    def is_sparse_layer(cfg, layer_idx: int) -> bool:
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        return (layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
                and cfg.num_experts > 0 and (layer_idx + 1) % step == 0)

    # ---- the model contract
    def remap_checkpoint_tensor(self, name: str, tensor: torch.Tensor):
        expert = expert_checkpoint_tensor(name, tensor, self.expert_projections)
        return [expert if expert is not None else (name, tensor)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(hidden, indices)  # [N, vocab]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
