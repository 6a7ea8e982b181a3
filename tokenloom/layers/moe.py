"""Sparse mixture-of-experts MLP (Mixtral): a top-k softmax router over gated-SiLU experts."""
import torch
import torch.nn.functional as F
from torch import nn


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        # Experts stacked: w13 holds gate (w1) over up (w3); w2 projects back down.
        self.experts_w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.experts_w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(router_probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # Loop over experts (few), never over tokens: each expert runs once on all tokens routed to it.
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
            gate, up = F.linear(x[tok], self.experts_w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.experts_w2[e]) * w_of[start : start + n, None]
            out.index_add_(0, tok, y)
            start += n
        return out
