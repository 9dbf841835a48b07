"""Phi-3: the Llama decoder with fused projections in the checkpoint and longrope scaling.

The checkpoint stores `qkv_proj` (q, k, v rows) and `gate_up_proj` (gate, up rows) already
fused; they are split into the q/k/v and gate/up shards every Llama-family model loads, so
the packed (and, with tensor parallelism, sharded) projections are the usual ones.
Longrope (`layers/rotary.py`): a sequence longer than the pretraining length rotates with
the long factors, through positions offset into the table's long rows.
"""

from __future__ import annotations

import torch

from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.rotary import longrope_original_length, longrope_positions
from nanovllm.models.llama import LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.max_positions = max_positions
        self.longrope_length = longrope_original_length(cfg)
        head_dim = head_dim_of(cfg)
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.qkv_split = [cfg.num_attention_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    def remap_checkpoint_tensor(self, name: str, tensor: torch.Tensor):
        """Fused checkpoint tensors -> the q/k/v and gate/up pieces (rows; biases alike)."""
        if ".qkv_proj." in name:
            if tensor.shape[0] != sum(self.qkv_split):
                return [(name, tensor)]  # the packed loader reports the shape
            parts = tensor.split(self.qkv_split, dim=0)
            return [(name.replace(".qkv_proj.", f".{p}_proj."), t) for p, t in zip("qkv", parts)]
        if ".gate_up_proj." in name:
            gate, up = tensor.chunk(2, dim=0)
            return [(name.replace(".gate_up_proj.", ".gate_proj."), gate), (name.replace(".gate_up_proj.", ".up_proj."), up)]
        return [(name, tensor)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.longrope_length is not None:  # rows of the long-factor half for long sequences
            positions = longrope_positions(positions, ctx.query_start_loc, ctx.seq_lens, self.longrope_length,
                                           self.max_positions)
        return self.model(input_ids, positions, ctx)  # [T, hidden]
