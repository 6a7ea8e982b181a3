"""Linear layers whose weights are held and applied by a LinearMethod.

A `Linear` keeps its place in the model, its sizes and its bias; its `method` creates the weights it needs
(`create_weights`), may rework them once loaded (`process_weights_after_loading`) and computes y = x W^T + b
(`apply`). Switching a layer's method (`set_method`) is how the float weights are repacked for the CPU, and where
LoRA and tensor-parallel shards plug in. Quantized weights are whole modules built from records (quant/linear.py)
swapped in for a Linear, gpt-fast style; they expose the same in_features / out_features / forward.

UnquantizedLinearMethod: a float `weight` [out, in] and F.linear. OneDNNLinearMethod: bfloat16 weights reordered
once into oneDNN's blocked layout. PyTorch's default bf16 matmul re-lays out the weight on every call, which
dominates a small-batch decode step; reordering once at load (what torch.compile's CPU freezing does) keeps the
same arithmetic, so outputs are unchanged, and makes batch-1 matrix-vector products several times faster.
"""
from __future__ import annotations

import abc
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("tokenloom")

ROW_BUCKET = 64  # prefill matmuls see row counts rounded up to this


def rows_bucketed(fn, x2: torch.Tensor) -> torch.Tensor:
    """fn(x2) over x2's rows padded with zeros to a multiple of ROW_BUCKET, cut back to x2's rows. oneDNN and
    torch keep kernels and primitives per matrix shape for good; without buckets each new prompt length adds
    some (about half a MiB per weight shape), so a server's memory grew with every new length it met."""
    rows = x2.shape[0]
    pad = -rows % ROW_BUCKET
    if not pad:
        return fn(x2)
    return fn(torch.cat([x2, x2.new_zeros(pad, x2.shape[1])]))[:rows]


class LinearMethod(abc.ABC):
    """How a Linear holds and applies its weight."""

    def create_weights(self, layer: "Linear", dtype: torch.dtype | None = None) -> None:
        """Register the parameters a fresh layer loads its checkpoint into (none for methods that only rework
        weights already loaded)."""

    def process_weights_after_loading(self, layer: "Linear") -> None:
        """Rework the loaded weights into this method's form (called once, when the layer takes the method)."""

    @abc.abstractmethod
    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        """y = x W^T (+ the layer's bias), for x [..., in_features]."""


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear", dtype: torch.dtype | None = None) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=dtype))

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class OneDNNLinearMethod(LinearMethod):
    """bfloat16 CPU weights in oneDNN's blocked layout (the float weight is dropped once reordered)."""

    def __init__(self, batch_hint: int = 32):
        self.batch_hint = batch_hint

    def process_weights_after_loading(self, layer: "Linear") -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), self.batch_hint)
        del layer.weight
        layer.register_buffer("packed_weight", packed, persistent=False)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_features)
        linear = lambda rows: torch.ops.mkldnn._linear_pointwise(rows, layer.packed_weight, layer.bias,  # noqa: E731
                                                                 "none", [], "")
        y = linear(x2) if x2.shape[0] < ROW_BUCKET else rows_bucketed(linear, x2)
        return y.view(*x.shape[:-1], layer.out_features)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, method: LinearMethod | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @property
    def holds_float_weight(self) -> bool:
        """The layer's `weight` is a plain float matrix (not yet repacked), as quantizers need it."""
        return type(self.method) is UnquantizedLinearMethod

    def set_method(self, method: LinearMethod) -> None:
        method.process_weights_after_loading(self)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={type(self.method).__name__}")


def _onednn_works(dtype: torch.dtype) -> bool:
    try:
        lin = Linear(64, 48, dtype=dtype)
        nn.init.normal_(lin.weight)
        x = torch.randn(3, 64, dtype=dtype)
        ref = lin(x)
        lin.set_method(OneDNNLinearMethod())
        return torch.equal(lin(x), ref)
    except (RuntimeError, AttributeError):
        return False


def pack_linear_layers(model: nn.Module) -> int:
    """Give every float bf16 Linear on the CPU the oneDNN method; returns how many were switched."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.holds_float_weight
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16]
    if not linears or not _onednn_works(torch.bfloat16):
        return 0
    for module in linears:
        module.set_method(OneDNNLinearMethod())
    log.debug("packed %d linear layers for oneDNN", len(linears))
    return len(linears)
