"""SiLU-and-mul: the gated MLP's activation on the packed gate_up output."""

from torch import nn

from nanovllm.layers import ops


class SiluAndMul(nn.Module):
    def forward(self, x):  # [T, 2 * I] -> [T, I]
        return ops.silu_and_mul(x)
