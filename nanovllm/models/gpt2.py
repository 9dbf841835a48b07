"""GPT-2: learned position embeddings, LayerNorm with bias, GELU (tanh) MLP, tied LM head.

Pre-norm blocks: h = h + attn(ln_1(h)); h = h + mlp(ln_2(h)); then ln_f. The checkpoint's
projections are `Conv1D`s, whose weights are stored transposed (`[in, out]`), and the
attention's q, k, v come fused in `c_attn`; `remap_checkpoint_tensor` transposes them and
splits c_attn into the q/k/v shards of the packed projection. No RoPE: the attention layer
stores K/V as they are (`cos_sin_cache=None`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.linear import Linear, LMHead, QKVLinear, VocabEmbedding, WeightShapeError
from nanovllm.layers.norm import LayerNorm

PREFIX = "transformer."
CONV1D_SUFFIXES = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # stored [in, out]
GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class GPT2Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.hidden_size = cfg.hidden_size
        self.c_attn = QKVLinear(cfg.hidden_size, self.head_dim, self.num_heads, self.num_heads, bias=True)
        for param in (self.c_attn.weight, self.c_attn.bias):  # loaded as the q, k, v thirds of c_attn
            param.expected_shards = ["q", "k", "v"]
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        scale = self.head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, hidden, positions, ctx: ForwardContext):
        q, k, v = self.c_attn(hidden).split(self.hidden_size, dim=-1)  # [T, hidden] each
        shape = (-1, self.num_heads, self.head_dim)
        out = self.attn(q.view(shape), k.view(shape), v.view(shape), positions, None, ctx)  # [T, H, D]
        return self.c_proj(out.reshape(-1, self.hidden_size))


class GPT2MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        act = getattr(cfg, "activation_function", "gelu_new")
        if act not in GELU_APPROXIMATION:
            raise ValueError(f"GPT-2 activation_function={act!r} is not supported; supported: {sorted(GELU_APPROXIMATION)}")
        self.approximate = GELU_APPROXIMATION[act]
        inner = getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
        self.c_fc = Linear(cfg.hidden_size, inner, bias=True)
        self.c_proj = Linear(inner, cfg.hidden_size, bias=True)

    def forward(self, hidden):
        return self.c_proj(F.gelu(self.c_fc(hidden), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(cfg.hidden_size, eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, hidden, residual, positions, ctx):
        if residual is None:
            residual, hidden = hidden, self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)  # ln_1(hidden + residual)
        hidden, residual = self.ln_2(self.attn(hidden, positions, ctx), residual)
        return self.mlp(hidden), residual


class GPT2Model(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.wte = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, input_ids, positions, ctx):
        hidden = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        residual = None
        for block in self.h:
            hidden, residual = block(hidden, residual, positions, ctx)
        return self.ln_f(hidden, residual)[0]


class GPT2LMHeadModel(nn.Module):
    packed_modules_mapping: dict = {}
    # the causal-mask buffers older checkpoints carry
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")
    tie_word_embeddings = True

    def __init__(self, cfg, max_positions: int) -> None:
        super().__init__()
        if max_positions > cfg.max_position_embeddings:
            raise ValueError(f"GPT-2 learned {cfg.max_position_embeddings} positions; max_model_len={max_positions} "
                             f"exceeds them: use max_model_len <= {cfg.max_position_embeddings}")
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.lm_head.weight = self.transformer.wte.weight

    def remap_checkpoint_tensor(self, name: str, tensor: torch.Tensor):
        """HF names with or without the `transformer.` prefix; Conv1D weights transposed; c_attn
        split into the q/k/v shards."""
        if not name.startswith(PREFIX) and name != "lm_head.weight":
            name = PREFIX + name
        if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2:
            tensor = tensor.t()  # [in, out] -> [out, in]
        if ".c_attn." not in name:
            return [(name, tensor)]
        if tensor.shape[0] % 3:
            raise WeightShapeError(f"tensor {name!r} of shape {tuple(tensor.shape)} is not a fused q/k/v projection")
        return [(name, part, shard) for part, shard in zip(tensor.chunk(3, dim=0), "qkv")]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.transformer(input_ids, positions, ctx)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(hidden, indices)  # [N, vocab]

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.transformer.h]
