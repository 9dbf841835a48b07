"""The `architectures` names the model registry serves, without importing the model code (torch).

The engine's config loading (loading/model_info.py) checks a config.json against these
before it builds anything; models/registry.py maps each one to its class.
"""

SUPPORTED_ARCHITECTURES = (
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM",
    "MixtralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
)


def unsupported_message(archs) -> str:
    return (f"model architecture {list(archs) or '(none given in config.json)'} is not supported; "
            f"supported architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")


def check_supported(hf_config) -> None:
    """ValueError naming the supported architectures unless the config names one of them."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(unsupported_message(archs))
