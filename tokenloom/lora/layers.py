"""LoRA layers: a model's linear layers wrapped (module swaps, as quantization does) so that the rows of a step that
run with an adapter get that adapter's delta on top of the shared base matmul.

    y = base(x);   y[rows of slot s] += (x[rows of slot s] @ A_s^T) @ (scale_s * B_s)^T

The base layer is kept as it is (float, oneDNN-packed or quantized), so base rows are exactly what they would be
without LoRA. Each wrapper holds max_loras slots of stacked factors; a fused layer (qkv_proj, gate_up_proj)
stacks the factors of the checkpoint modules it packs (q/k/v, gate/up), each slice's B^T only filling that
slice's output columns. Which rows run with which slot is the step's LoRAMapping, read from the forward context.
The deltas of every adapter of the step are one call of the compiled kernel (kernels/lora_ops.py), or, where it
does not run, two matmuls per adapter over its group of rows (a loop over the step's adapters, never its tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.kernels import lora_ops
from tokenloom.model_executor.forward_context import current_lora_mapping
from tokenloom.model_executor.layers.moe import SparseMoE


@dataclass(frozen=True)
class LoRATarget:
    """One of our linear layers that adapters may change: the checkpoint modules it packs, as
    (checkpoint module, first output row, rows), and its input width."""
    parts: tuple[tuple[str, int, int], ...]
    in_features: int
    out_features: int


class LoRALinear(nn.Module):
    """A linear layer plus the deltas of the adapters in its slots, for the rows the step's mapping gives them."""

    def __init__(self, base: nn.Module, max_loras: int, max_rank: int, out_slices: list[tuple[int, int]],
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.out_slices = out_slices  # (first output, outputs) of each packed checkpoint module
        rows = len(out_slices) * max_rank
        # slot s: A's rows in the first n rows of lora_a[s] ([n, in]), B^T's (its scale folded in) in those of
        # lora_b[s] ([n, out]), in the model's dtype (read at every step: bytes count); the products are float32
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("lora_a", torch.zeros(max_loras, rows, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, rows, self.out_features, **kw), persistent=False)
        # per slot and slice: (first rank row, ranks, first output, outputs); ranks 0 where the adapter has none
        self.slices = torch.tensor([[[0, 0, o, n] for o, n in out_slices]] * max_loras, dtype=torch.long)
        self.factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * max_loras  # (A, B^T) views
        self.kernel_ok = self.in_features % 16 == 0 and all(o % 16 == 0 and n % 16 == 0 for o, n in out_slices)

    def set_slot(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor, list] | None) -> None:
        """Put an adapter's factors for this layer in a slot: A [n, in], B^T [n, out] and each slice's
        (first rank row, ranks) in them (None: the adapter leaves the layer alone)."""
        self.slices[slot, :, :2] = 0
        if factors is None:
            self.factors[slot] = None
            return
        a, bt, ranks = factors
        n = a.shape[0]
        self.lora_a[slot, :n].copy_(a)
        self.lora_b[slot, :n].copy_(bt)
        self.slices[slot, :, :2] = torch.tensor(ranks, dtype=torch.long)
        self.factors[slot] = (self.lora_a[slot, :n], self.lora_b[slot, :n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mapping = current_lora_mapping()
        if mapping is None:
            return y
        if not y.is_contiguous():  # the deltas are added in place, through a view
            y = y.contiguous()
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        ops = lora_ops.ops_for(x2) if self.kernel_ok and x2.dtype == y2.dtype == self.lora_a.dtype else None
        if ops is not None:
            ops.lora_apply_(y2, x2.contiguous(), self.lora_a, self.lora_b, self.slices, mapping.runs)
            return y
        xf = x2.float()  # no copy in a float32 model
        for slot, rows in mapping.groups:  # the torch code: per adapter, one run of rows or their indices
            ab = self.factors[slot]
            if ab is None:
                continue
            a, b_t = ab[0].float(), ab[1].float()  # CPU bfloat16 matmuls of these thin shapes are slow
            if isinstance(rows, slice):
                y2[rows] += torch.mm(F.linear(xf[rows], a), b_t)
            else:
                y2.index_add_(0, rows, torch.mm(F.linear(xf.index_select(0, rows), a), b_t).to(y2.dtype))
        return y

    def extra_repr(self) -> str:
        return f"slots={len(self.factors)}, max_rank_rows={self.lora_a.shape[1]}"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int)


def _linears(module: nn.Module, prefix: str):
    """(name, module) of the linear layers under `module`, not descending into one (a quantized layer's parts)
    nor into mixture-of-experts blocks (their experts are stacked weights, not linear layers)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}"
        if _is_linear(child):
            yield full, child
        elif not isinstance(child, SparseMoE):
            yield from _linears(child, full)


def lora_targets(model) -> dict[str, LoRATarget]:
    """Our decoder layers' linear layers (by module name) with the checkpoint modules each packs."""
    targets = {}
    for i, layer in enumerate(model.layers):
        for name, module in _linears(layer, f"layers.{i}"):
            parts, first = [], 0
            for ckpt, rows in model.checkpoint_parts(name):
                rows = module.out_features if rows < 0 else rows
                parts.append((ckpt, first, rows))
                first += rows
            if first == module.out_features:  # a layer whose packing the model does not declare is left alone
                targets[name] = LoRATarget(tuple(parts), module.in_features, module.out_features)
    return targets


def wrap_model(model, targets: dict[str, LoRATarget], max_loras: int, max_rank: int) -> dict[str, LoRALinear]:
    """Swap a LoRALinear in for each target layer; returns them by module name."""
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    wrapped = {}
    for name, target in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise RuntimeError(f"{name} is wrapped for LoRA already")
        slices = [(first, rows) for _, first, rows in target.parts]
        layer = LoRALinear(base, max_loras, max_rank, slices, dtype, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
