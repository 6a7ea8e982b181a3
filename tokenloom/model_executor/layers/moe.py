"""Sparse mixture-of-experts MLP: a top-k softmax router over gated-SiLU experts (Mixtral, Qwen2-MoE, Qwen3-MoE),
the chosen experts' weights renormalised or not (norm_topk_prob), plus Qwen2-MoE's shared expert."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def route_and_combine(x: torch.Tensor, router_logits: torch.Tensor, top_k: int, num_experts: int,
                      expert: Callable[[int, torch.Tensor], torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """Top-k softmax routing (normalize: weights renormalised over the chosen experts); expert(e, tokens) runs one
    expert.

    Loops over experts (few), never over tokens: each expert runs once on all tokens routed to it.
    """
    router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(router_probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(x.dtype)
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


def moe_forward(moe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A MoE block's output: its routed experts (moe._expert) plus, where it has one, the shared expert every
    token takes, weighted by sigmoid(shared_expert_gate(x)). SparseMoE's forward, and that of its quantized form
    (quant.moe.QuantSparseMoE)."""
    out = route_and_combine(x, moe.gate(x), moe.top_k, moe.num_experts, moe._expert, moe.normalize)
    if moe.shared_expert is not None:
        out = out + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    return out


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, normalize: bool = True,
                 shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k, self.num_experts, self.normalize = top_k, num_experts, normalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        # Experts stacked: w13 holds gate (w1) over up (w3); w2 projects back down.
        self.experts_w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.experts_w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.shared_expert = shared_expert
        self.shared_expert_gate = None if shared_expert is None else nn.Linear(hidden, 1, bias=False)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.experts_w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.experts_w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(self, x)
