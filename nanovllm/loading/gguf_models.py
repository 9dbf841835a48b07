"""The GGUF architectures nanovllm reads: their HF config class, tensor names and quirks.

llama.cpp names tensors by role (`blk.N.attn_q`, `blk.N.ffn_gate_exps`, ... the gguf package's
tensor name maps); each architecture here says which HF module each role is, which config
fields its metadata fills beyond the common ones, and what llama.cpp's converter did to its
tensors that must be undone:

- llama: Q/K rows permuted (interleaved rotary halves); with experts it is Mixtral;
- gemma2 / gemma3: every norm weight stored as 1 + w (Gemma's scale), the query scale not
  stored (llama.cpp derives it from the head size, the 27B models from hidden / heads), the
  local layers' RoPE base fixed at 10k (Gemma 3);
- qwen3moe / Mixtral: the experts of a layer stored stacked (`ffn_gate_exps [E, I, H]`, ...),
  split here into HF's per-expert tensors (older Mixtral files store them per expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# GGUF tensor stems -> HF module names (per layer); the ".weight" / ".bias" suffix carries over.
LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER_NAMES = {
    **LLAMA_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # Gemma's sandwich: before the MLP ...
    "post_ffw_norm": "post_feedforward_layernorm",  # ... and after it
}
EXPERT = "{expert}"  # placeholder of the expert index in the HF names of stacked tensors
STACKED_EXPERT_STEMS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}  # index into expert_names
PER_EXPERT_STEMS = {"ffn_gate": 0, "ffn_up": 1, "ffn_down": 2}  # older Mixtral files: blk.N.ffn_gate.E.weight

GEMMA_LOCAL_ROPE_THETA = 10000.0  # llama.cpp's fixed base of Gemma 3's sliding layers
GEMMA3_GLOBAL_EVERY = 6  # Gemma 3: every sixth layer is global when the file does not say
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales their queries by hidden / heads


@dataclass(frozen=True)
class GGUFArchitecture:
    config_class_name: str  # a transformers config class
    hf_architecture: str  # what goes into config.architectures
    permute_qk: bool  # llama.cpp's converter interleaves the rotary halves of Q/K rows (llama only)
    layer_names: dict = field(default_factory=lambda: LLAMA_LAYER_NAMES)
    norm_offset: float = 0.0  # subtract from every norm weight (Gemma: llama.cpp stored 1 + w)
    moe_block: Optional[str] = None  # HF module of a sparse layer's router and experts
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")
    # extra HF config fields: fn(metadata getter, common config kwargs, tensor names) -> kwargs
    config_extras: Optional[Callable[[Callable, dict, set], dict]] = None

    def layer_tensor_name(self, stem: str) -> Optional[str]:
        """HF module of a layer tensor stem (with EXPERT for stacked experts), or None."""
        if stem in self.layer_names:
            return self.layer_names[stem]
        if self.moe_block is None:
            return None
        if stem == "ffn_gate_inp":
            return f"{self.moe_block}.gate"
        if stem in STACKED_EXPERT_STEMS:
            return f"{self.moe_block}.experts.{EXPERT}.{self.expert_names[STACKED_EXPERT_STEMS[stem]]}"
        return None

    def expert_tensor_name(self, stem: str, expert: int) -> Optional[str]:
        """HF module of an older per-expert tensor (`blk.N.ffn_gate.E`), or None."""
        if self.moe_block is None or stem not in PER_EXPERT_STEMS:
            return None
        return f"{self.moe_block}.experts.{expert}.{self.expert_names[PER_EXPERT_STEMS[stem]]}"


def _gemma_extras(arch: str) -> Callable[[Callable, dict, set], dict]:
    def extras(get, common: dict, tensor_names: set) -> dict:
        layers, head_dim = common["num_hidden_layers"], common["head_dim"]
        scale = get("attention.scale", None)
        if scale:
            scalar = round(scale**-2)  # an int in HF configs (256, 144, 168)
        elif layers == GEMMA_27B_LAYERS[arch]:
            scalar = common["hidden_size"] // common["num_attention_heads"]
        else:
            scalar = head_dim
        out = dict(query_pre_attn_scalar=scalar, sliding_window=get("attention.sliding_window", None),
                   hidden_activation="gelu_pytorch_tanh")
        if arch == "gemma2":
            out |= dict(attn_logit_softcapping=get("attn_logit_softcapping", None),
                        final_logit_softcapping=get("final_logit_softcapping", None))
            return out
        pattern = get("attention.sliding_window_pattern", GEMMA3_GLOBAL_EVERY)
        if isinstance(pattern, list):  # per layer: True = sliding
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [bool((i + 1) % pattern) for i in range(layers)]
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        global_rope = {"rope_type": "default", **(common.pop("rope_scaling") or {}), "rope_theta": common.pop("rope_theta")}
        out["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": GEMMA_LOCAL_ROPE_THETA},
                                  "full_attention": global_rope}
        return out

    return extras


def _qwen3moe_extras(get, common: dict, tensor_names: set) -> dict:
    moe_ffn = get("expert_feed_forward_length")
    dense = [i for i in range(common["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
    return dict(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                moe_intermediate_size=moe_ffn, intermediate_size=get("feed_forward_length", moe_ffn),
                mlp_only_layers=dense,  # layers without a router keep a dense MLP
                norm_topk_prob=bool(get("expert_weights_norm", True)))  # Qwen3-MoE renormalises (HF config: true)


def _mixtral_extras(get, common: dict, tensor_names: set) -> dict:
    return dict(num_local_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                sliding_window=get("attention.sliding_window", None))


SUPPORTED_ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaConfig", "LlamaForCausalLM", permute_qk=True),
    "qwen2": GGUFArchitecture("Qwen2Config", "Qwen2ForCausalLM", permute_qk=False),
    "qwen3": GGUFArchitecture("Qwen3Config", "Qwen3ForCausalLM", permute_qk=False),
    "qwen3moe": GGUFArchitecture("Qwen3MoeConfig", "Qwen3MoeForCausalLM", permute_qk=False, moe_block="mlp",
                                 config_extras=_qwen3moe_extras),
    "gemma2": GGUFArchitecture("Gemma2Config", "Gemma2ForCausalLM", permute_qk=False, layer_names=GEMMA_LAYER_NAMES,
                               norm_offset=1.0, config_extras=_gemma_extras("gemma2")),
    "gemma3": GGUFArchitecture("Gemma3TextConfig", "Gemma3ForCausalLM", permute_qk=False,
                               layer_names=GEMMA_LAYER_NAMES, norm_offset=1.0, config_extras=_gemma_extras("gemma3")),
}
# A llama file with experts is Mixtral (llama.cpp converts Mixtral to its llama architecture).
MIXTRAL = GGUFArchitecture("MixtralConfig", "MixtralForCausalLM", permute_qk=True, moe_block="block_sparse_moe",
                           expert_names=("w1", "w3", "w2"), config_extras=_mixtral_extras)


def architecture_of(arch: str, metadata: dict[str, Any]) -> GGUFArchitecture:
    """The spec of a supported `general.architecture` (the caller checked it is supported)."""
    if arch == "llama" and metadata.get("llama.expert_count"):
        return MIXTRAL
    return SUPPORTED_ARCHITECTURES[arch]
