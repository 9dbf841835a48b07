"""Mixtral: the sparse MoE decoder under Mixtral's checkpoint names.

Every layer is sparse (`block_sparse_moe`: router `gate`, experts `w1` gate / `w3` up / `w2`
down), the top_k weights are always renormalised, no q/k norm; the attention is Mistral's
(a sliding window when the config sets one).
"""

from nanovllm.layers.moe import DOWN, GATE, UP
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM


class MixtralForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    moe_attribute = "block_sparse_moe"
    expert_projections = {"w1": GATE, "w3": UP, "w2": DOWN}

    @staticmethod
    def num_experts(cfg) -> int:
        return cfg.num_local_experts

    @staticmethod
    def moe_intermediate_size(cfg) -> int:
        return cfg.intermediate_size

    @staticmethod
    def renormalize(cfg) -> bool:
        return True

    @staticmethod
    def is_sparse_layer(cfg, layer_idx: int) -> bool:
        return True
