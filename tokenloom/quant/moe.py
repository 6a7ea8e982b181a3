"""A sparse MoE block with quantized experts (swapped in for layers.moe.SparseMoE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.model_executor.layers.moe import SparseMoE, moe_forward


class QuantSparseMoE(nn.Module):
    """The float block's router, routing and shared expert (kept in float), with each expert's matmuls through
    its quantized modules."""

    def __init__(self, moe: SparseMoE | QuantSparseMoE, w13: list[nn.Module], w2: list[nn.Module]):
        super().__init__()
        self.gate = moe.gate
        self.experts_w13 = nn.ModuleList(w13)
        self.experts_w2 = nn.ModuleList(w2)
        self.top_k, self.num_experts, self.normalize = moe.top_k, len(w13), moe.normalize
        self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.experts_w13[e](x).chunk(2, dim=-1)
        return self.experts_w2[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(self, x)
