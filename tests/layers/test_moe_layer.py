"""The MoE layer: routing (softmax, top-k, optional renormalisation) and per-expert weight
loading into the stacked weights (HF per-expert names, Mixtral's w1/w3/w2, stacked tensors,
and the errors for a missing or misshapen expert)."""

from __future__ import annotations

import pytest
import torch

from nanovllm.layers.moe import FusedMoE, expert_checkpoint_tensor, route
from nanovllm.loading.weights import load_weights
from nanovllm.models.mixtral import MixtralForCausalLM
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM
from tiny_models import FAMILY_CONFIGS


def test_route_picks_top_k_and_renormalises():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    weights, ids = route(logits, 2, renormalize=False)
    probs = logits.softmax(-1)
    assert ids.tolist() == [[1, 3], [0, 3]]
    torch.testing.assert_close(weights, probs.gather(1, ids))
    weights, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert weights.dtype == torch.float32


def test_expert_names_map_to_slices_of_the_stacked_weights():
    t = torch.zeros(3)
    names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    assert expert_checkpoint_tensor("model.layers.2.mlp.experts.17.up_proj.weight", t, names)[::2] == (
        "model.layers.2.mlp.experts.w13_weight", (17, "up"))
    assert expert_checkpoint_tensor("model.layers.0.mlp.experts.3.down_proj.weight", t, names)[2] == (3, "down")
    assert expert_checkpoint_tensor("model.layers.0.mlp.experts.gate_up_proj", t, names)[::2] == (
        "model.layers.0.mlp.experts.w13_weight", None)
    assert expert_checkpoint_tensor("model.layers.0.mlp.gate.weight", t, names) is None  # the router


def test_expert_loader_places_gate_up_and_down():
    moe = FusedMoE(num_experts=3, hidden_size=4, intermediate_size=2, top_k=1, renormalize=False)
    gate, up, down = torch.full((2, 4), 1.0), torch.full((2, 4), 2.0), torch.full((4, 2), 3.0)
    moe.load_expert(moe.w13_weight, gate, (1, "gate"), name="g")
    moe.load_expert(moe.w13_weight, up, (1, "up"), name="u")
    moe.load_expert(moe.w2_weight, down, (1, "down"), name="d")
    assert torch.equal(moe.w13_weight.data[1], torch.cat([gate, up]))
    assert torch.equal(moe.w2_weight.data[1], down)
    with pytest.raises(ValueError, match="expected shape"):
        moe.load_expert(moe.w13_weight, torch.zeros(3, 4), (0, "gate"), name="bad")
    with pytest.raises(ValueError, match="expert 5"):
        moe.load_expert(moe.w13_weight, gate, (5, "gate"), name="bad")


@pytest.mark.parametrize("name,cls", [("qwen3_moe", Qwen3MoeForCausalLM), ("mixtral", MixtralForCausalLM)])
def test_per_expert_checkpoint_loads_and_a_missing_expert_is_named(name, cls, tiny_model_factory):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_factory(name)
    cfg, state = AutoConfig.from_pretrained(path), load_file(f"{path}/model.safetensors")  # per-expert names
    model = cls(cfg, 64)
    load_weights(model, ((k, v, "ckpt") for k, v in state.items()))
    moe = getattr(model.model.layers[0], cls.moe_attribute).experts
    up = "w3" if name == "mixtral" else "up_proj"
    key = f"model.layers.0.{cls.moe_attribute}.experts.1.{up}.weight"
    assert torch.equal(moe.w13_weight.data[1, moe.intermediate_size :], state[key])
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"missing tensors.*experts\.w13_weight:\(1, 'up'\)"):
        load_weights(cls(cfg, 64), ((k, v, "ckpt") for k, v in missing.items()))
    if name == "qwen3_moe":  # transformers 5's in-memory form: each layer's experts stacked
        stacked = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        assert "model.layers.0.mlp.experts.gate_up_proj" in stacked
        other = cls(cfg, 64)
        load_weights(other, ((k, v, "ckpt") for k, v in stacked.items()))
        torch.testing.assert_close(other.model.layers[0].mlp.experts.w13_weight, moe.w13_weight)
