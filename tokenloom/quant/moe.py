"""Mixtral's sparse MoE with quantized experts (swapped in for layers.moe.SparseMoE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.model_executor.layers.moe import route_and_combine


class QuantSparseMoE(nn.Module):
    def __init__(self, gate: nn.Module, w13: list[nn.Module], w2: list[nn.Module], top_k: int):
        super().__init__()
        self.gate = gate
        self.experts_w13 = nn.ModuleList(w13)
        self.experts_w2 = nn.ModuleList(w2)
        self.top_k, self.num_experts = top_k, len(w13)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.experts_w13[e](x).chunk(2, dim=-1)
        return self.experts_w2[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the routing of layers.moe.SparseMoE, with each expert's matmuls through its quantized modules
        return route_and_combine(x, self.gate(x), self.top_k, self.num_experts, self._expert)
