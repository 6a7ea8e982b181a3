"""CPU fast path for bfloat16 linear layers: weights reordered once into oneDNN's blocked layout.

PyTorch's default bf16 matmul re-lays out the weight on every call; a small-batch decode step is dominated by
that. Reordering once at load (what torch.compile's CPU freezing does) keeps the same arithmetic, so outputs are
unchanged, and makes batch-1 matrix-vector products several times faster.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("tokenloom")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                               "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def _packing_works(dtype: torch.dtype) -> bool:
    try:
        lin = nn.Linear(64, 48, bias=False).to(dtype)
        x = torch.randn(3, 64, dtype=dtype)
        return torch.equal(PackedLinear(lin)(x), F.linear(x, lin.weight))
    except (RuntimeError, AttributeError):
        return False


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every plain bf16 nn.Linear on the CPU for a PackedLinear; returns how many were swapped."""
    linears = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16]
    if not linears or not _packing_works(torch.bfloat16):
        return 0
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(module))
    log.debug("packed %d linear layers for oneDNN", len(linears))
    return len(linears)
