"""Mixtral's sparse MoE with quantized experts (swapped in for layers.moe.SparseMoE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantSparseMoE(nn.Module):
    def __init__(self, gate: nn.Module, w13: list[nn.Module], w2: list[nn.Module], top_k: int):
        super().__init__()
        self.gate = gate
        self.experts_w13 = nn.ModuleList(w13)
        self.experts_w2 = nn.ModuleList(w2)
        self.top_k, self.num_experts = top_k, len(w13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the routing of layers.moe.SparseMoE, with each expert's matmuls through its quantized modules
        router_probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(router_probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of = order // self.top_k
        w_of = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            gate, up = self.experts_w13[e](x[tok]).chunk(2, dim=-1)
            y = self.experts_w2[e](F.silu(gate) * up) * w_of[start : start + n, None]
            out.index_add_(0, tok, y.to(x.dtype))
            start += n
        return out
