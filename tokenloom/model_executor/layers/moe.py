"""Sparse mixture-of-experts MLP (Mixtral): a top-k softmax router over gated-SiLU experts."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def route_and_combine(x: torch.Tensor, router_logits: torch.Tensor, top_k: int, num_experts: int,
                      expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Top-k softmax routing (weights renormalised over the chosen experts); expert(e, tokens) runs one expert.

    Loops over experts (few), never over tokens: each expert runs once on all tokens routed to it.
    """
    router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(router_probs, top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    token_of = order // top_k
    w_of = weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        y = expert(e, x[tok]) * w_of[start : start + n, None]
        out.index_add_(0, tok, y.to(x.dtype))
        start += n
    return out


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        # Experts stacked: w13 holds gate (w1) over up (w3); w2 projects back down.
        self.experts_w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.experts_w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.experts_w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.experts_w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return route_and_combine(x, self.gate(x), self.top_k, self.num_experts, self._expert)
