"""Check the fields of a model config that the engine divides by, loops over or sizes tensors with.

A config.json (or GGUF metadata) with `num_attention_heads: 0` or `num_hidden_layers: -1`
would otherwise fail far from its cause (ZeroDivisionError in the attention layer, an empty
model that emits garbage); here it is a ValueError naming the file and the field.
"""

from __future__ import annotations

import math

# Fields every supported architecture needs, as positive integers.
REQUIRED_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Fields that may be absent (or None), but must be positive integers when given (a missing
# intermediate_size takes the config class's default; GPT-2's n_inner None means 4 * hidden).
OPTIONAL_POSITIVE_INTS = ("intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings")
# GPT-2's config.json spells these fields its own way (its config class maps them).
FIELD_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                 "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"}


def validate_hf_config(hf_config, where: str) -> None:
    """Raise ValueError("<where>: <field>=<value> ...") for the first bad key field.

    `hf_config` is a transformers config or the plain dict it is built from (checked first:
    transformers itself divides by num_attention_heads while building some configs).
    """
    if isinstance(hf_config, dict):
        def get(name: str, default=None):
            value = hf_config.get(name)
            if value is None and name in FIELD_ALIASES:
                value = hf_config.get(FIELD_ALIASES[name])
            return default if value is None else value
    else:
        def get(name: str, default=None):
            value = getattr(hf_config, name, None)
            if value is None and name in FIELD_ALIASES:
                value = getattr(hf_config, FIELD_ALIASES[name], None)
            return default if value is None else value

    def fail(name: str, value, rule: str) -> None:
        raise ValueError(f"{where}: {name}={value!r} {rule}; fix the model config")

    for name in REQUIRED_POSITIVE_INTS:
        value = get(name)
        if value is None:
            fail(name, value, "is missing (a positive integer is required)")
        if not _is_positive_int(value):
            fail(name, value, "must be a positive integer")
    for name in OPTIONAL_POSITIVE_INTS:
        value = get(name)
        if value is not None and not _is_positive_int(value):
            fail(name, value, "must be a positive integer (or absent)")
    heads, hidden, kv_heads = get("num_attention_heads"), get("hidden_size"), get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        fail("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    if get("head_dim") is None and hidden % heads:
        fail("hidden_size", hidden, f"must be a multiple of num_attention_heads={heads} when head_dim is not given")
    eps = get("rms_norm_eps")
    if eps is not None and not _is_positive_number(eps):
        fail("rms_norm_eps", eps, "must be a positive number")
    rope_params = get("rope_parameters")
    thetas = [("rope_theta", get("rope_theta"))]
    if isinstance(rope_params, dict):
        thetas.append(("rope_parameters.rope_theta", rope_params.get("rope_theta")))
    for name, theta in thetas:
        if theta is not None and not _is_positive_number(theta):
            fail(name, theta, "must be a positive number")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)
