"""Shared fixtures: tiny random-weight HF models saved to a temp dir, and the bundled model."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in the interpreter (fp32); this must be set before any
# test module imports a kernel, whichever directory pytest collects first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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


def build_tiny_model(name: str, path: str, seed: int = 0) -> str:
    """Save a random-weight model of TINY_CONFIGS[name] (safetensors + config.json) to path."""
    import transformers

    spec = dict(TINY_CONFIGS[name])
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


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = build_tiny_model(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def bundled_llm():
    """One engine on the bundled SmolLM2 GGUF, shared by the tests that only read from it."""
    from nanovllm import LLM

    return LLM(max_model_len=1024)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
