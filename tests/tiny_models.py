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


WINDOW = 8  # sliding window of the windowed tiny models: prompts of 17 and 40 tokens overrun it

# The other model families (tests/models/test_model_families.py), one tiny config each.
FAMILY_CONFIGS = {
    "mistral_window": dict(arch="MistralForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=600, sliding_window=WINDOW,
                           tie_word_embeddings=False, max_position_embeddings=512),
    "gemma2": dict(arch="Gemma2ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                   vocab_size=500, sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   max_position_embeddings=512),
    "gemma3": dict(arch="Gemma3ForCausalLM", hidden_size=64, intermediate_size=80, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                   vocab_size=700, sliding_window=WINDOW, max_position_embeddings=512,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
    "gpt2": dict(arch="GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, vocab_size=555, n_positions=256),
    # head_dim 24 (not a power of two: the padded cache path); longrope switching at 64 tokens
    "phi3_longrope": dict(arch="Phi3ForCausalLM", hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=640, max_position_embeddings=256,
                          original_max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 64,
                                        "short_factor": [1.0 + 0.1 * i for i in range(12)],
                                        "long_factor": [1.5 + 0.5 * i for i in range(12)]}),
    "qwen3_moe": dict(arch="Qwen3MoeForCausalLM", hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], vocab_size=800,
                      tie_word_embeddings=False, max_position_embeddings=512),
    "mixtral": dict(arch="MixtralForCausalLM", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=650, sliding_window=12, tie_word_embeddings=False, max_position_embeddings=512),
}
ALL_CONFIGS = {**TINY_CONFIGS, **FAMILY_CONFIGS}
CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                  "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                  "Gemma2ForCausalLM": "Gemma2Config", "Gemma3ForCausalLM": "Gemma3TextConfig",
                  "GPT2LMHeadModel": "GPT2Config", "Phi3ForCausalLM": "Phi3Config",
                  "Qwen3MoeForCausalLM": "Qwen3MoeConfig", "MixtralForCausalLM": "MixtralConfig"}


def build_tiny_model(name: str, path: str, seed: int = 0) -> str:
    """Save a random-weight model of ALL_CONFIGS[name] (safetensors + config.json) to path."""
    import transformers

    spec = dict(ALL_CONFIGS[name])
    arch = spec.pop("arch")
    config_cls = getattr(transformers, CONFIG_CLASSES[arch])
    extra = {} if arch == "GPT2LMHeadModel" else {"rms_norm_eps": 1e-6}
    config = config_cls(**spec, bos_token_id=1, eos_token_id=2, **extra)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # the default init is tiny; widen it so outputs depend on every weight
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path
