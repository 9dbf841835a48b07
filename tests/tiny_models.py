"""Tiny random-weight HF models (safetensors + config.json) built from transformers configs.

Imported by tests as `from tiny_models import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import torch

# Small but awkward shapes: GQA, head_dim not hidden/heads, odd vocab and MLP sizes.
TINY_CONFIGS = {
    "llama": dict(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                  rope_theta=10000.0, max_position_embeddings=512),
    "llama_tied_llama3rope": dict(arch="LlamaForCausalLM", hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=2, vocab_size=777, tie_word_embeddings=True,
                                  rope_theta=500000.0, max_position_embeddings=512,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(arch="Qwen2ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, vocab_size=911, tie_word_embeddings=True,
                  rope_theta=1000000.0, max_position_embeddings=512),
    "qwen3": dict(arch="Qwen3ForCausalLM", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1003,
                  tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=512),
}


def build_tiny_model(name: str, path: str, seed: int = 0, **overrides) -> str:
    """Save a random-weight model of TINY_CONFIGS[name] (safetensors + config.json) to path;
    `overrides` replace config entries (e.g. an odd intermediate_size)."""
    import transformers

    spec = {**TINY_CONFIGS[name], **overrides}
    arch = spec.pop("arch")
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
                  "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    config = config_cls(**spec, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # the default init is tiny; widen it so outputs depend on every weight
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path
