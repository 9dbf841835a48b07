"""Sparse mixture-of-experts: top-k routing and the experts as stacked weights.

`FusedMoE` holds every expert's projections stacked, `w13_weight [E, 2I, H]` (gate rows then
up rows) and `w2_weight [E, H, I]`, so that the experts run as grouped GEMMs: the Triton
fused-MoE kernel on CUDA (`kernels/fused_moe.py`: two launches for all experts), the
vectorised torch path elsewhere (`kernels/moe_reference.fused_moe_torch`). No Python loop
over tokens or experts runs on either.

Routing (`route`): softmax over the router logits in fp32, the top_k experts, and their
probabilities renormalised to sum to 1 when the model asks (Mixtral always; Qwen3-MoE with
`norm_topk_prob`).

Checkpoints store one tensor per expert and projection (`...experts.{e}.gate_proj.weight`,
Mixtral's `w1` / `w3` / `w2`); `expert_checkpoint_tensor` maps such a name to its slice of
the stacked weight, and the weight loaders copy it there. A checkpoint with the stacked
tensors (`experts.gate_up_proj`, `experts.down_proj`) loads whole.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from nanovllm.kernels.moe_reference import fused_moe_torch
from nanovllm.layers import ops
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS
from nanovllm.layers.linear import Linear, WeightShapeError, check_shape

GATE, UP, DOWN = "gate", "up", "down"
_PER_EXPERT = re.compile(r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")
_STACKED = {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}  # transformers 5's in-memory names


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, top_k] fp32, expert ids [T, top_k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_checkpoint_tensor(name: str, tensor: torch.Tensor, proj_names: dict[str, str]):
    """(parameter name, tensor, shard) of a per-expert or stacked checkpoint tensor, or None.

    `proj_names` maps the checkpoint's projection names to gate / up / down (Qwen3-MoE:
    gate_proj / up_proj / down_proj; Mixtral: w1 / w3 / w2).
    """
    match = _PER_EXPERT.fullmatch(name)
    if match and match["proj"] in proj_names:
        which = proj_names[match["proj"]]
        param = "w2_weight" if which == DOWN else "w13_weight"
        return f"{match['prefix']}.{param}", tensor, (int(match["expert"]), which)
    prefix, _, last = name.rpartition(".")
    if prefix.endswith(".experts") and last in _STACKED:
        return f"{prefix}.{_STACKED[last]}", tensor, None
    return None


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int,
                 renormalize: bool) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for param, parts in ((self.w13_weight, (GATE, UP)), (self.w2_weight, (DOWN,))):
            param.weight_loader = self.load_expert
            param.expected_shards = [(e, p) for e in range(num_experts) for p in parts]
        self.kernel_options = DEFAULT_KERNEL_OPTIONS

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard=None, name: str = "") -> None:
        if shard is None:  # the whole stacked tensor
            check_shape(name, param.shape, loaded.shape)
            param.data.copy_(loaded)
            return
        expert, which = shard
        if not 0 <= expert < self.num_experts:
            raise WeightShapeError(f"tensor {name!r}: expert {expert} of a layer with {self.num_experts} experts")
        target = param.data[expert]  # [2I, H] or [H, I]
        if which in (GATE, UP):
            target = target.narrow(0, 0 if which == GATE else self.intermediate_size, self.intermediate_size)
        check_shape(name, target.shape, loaded.shape)
        target.copy_(loaded)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] -> sum over the top_k experts of weight * expert(hidden)."""
        weights, ids = route(router_logits, self.top_k, self.renormalize)  # [T, k] each
        if ops.use_triton(hidden, self.kernel_options):
            from nanovllm.kernels import fused_moe

            return fused_moe.fused_moe(hidden, self.w13_weight, self.w2_weight, weights, ids,
                                       act_and_mul=lambda x: ops.silu_and_mul(x, self.kernel_options))
        return fused_moe_torch(hidden, self.w13_weight, self.w2_weight, weights, ids)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, a Linear [E, H]) and experts: the MLP of a sparse decoder layer."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, top_k: int,
                 renormalize: bool) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, top_k, renormalize)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))  # [T, H]



def active_param_bytes(params, model: nn.Module) -> int:
    """Bytes of `params` (the model's, deduplicated) one token's forward reads: every
    parameter, but a FusedMoE's stacked experts only top_k of E (batch-1 decode)."""
    share = {}
    for module in model.modules():
        if isinstance(module, FusedMoE):
            for p in (module.w13_weight, module.w2_weight):
                share[id(p)] = (module.top_k, module.num_experts)
    total = 0
    for p in params:
        size = p.numel() * p.element_size()
        top_k, experts = share.get(id(p), (1, 1))
        total += size * top_k // experts
    return total
