"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k (before RoPE).

On the Triton path the norms run inside the RoPE + KV-store kernel (see
`layers/attention/layer.py`), saving two launches per layer.
"""

from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
