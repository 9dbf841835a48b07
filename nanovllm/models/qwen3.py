"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k (before RoPE)."""

from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
