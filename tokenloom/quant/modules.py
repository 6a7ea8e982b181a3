"""Module swaps: find a model's linear layers, quantize their weights and put quantized modules in their place."""
from __future__ import annotations

import sys

import torch
from torch import nn

from tokenloom.config import TokenloomError
from tokenloom.model_executor.layers.linear import Linear
from tokenloom.model_executor.layers.moe import SparseMoE
from tokenloom.quant.linear import QuantizedEmbedding, build_linear
from tokenloom.quant.moe import QuantSparseMoE
from tokenloom.quant.nf4 import quantize_nf4
from tokenloom.quant.options import LINEAR_NAMES, QuantizeResult, QuantOptions
from tokenloom.quant.rtn import quantize_affine, quantize_int8


def model_dtype(model) -> torch.dtype:
    return model.norm.weight.dtype


def get_module(model: nn.Module, name: str) -> nn.Module:
    m = model
    for part in name.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def quantize_weight(w: torch.Tensor, opts: QuantOptions):
    """The record of one float weight [N, K] under the RTN-type methods."""
    if opts.method == "int8":
        return quantize_int8(w)
    if opts.method == "nf4":
        return quantize_nf4(w, opts.block_size, opts.double_quant)
    return quantize_affine(w, opts.bits, opts.group_size, opts.sym)


def swap_linear(model, name: str, rec, act, opts: QuantOptions, result: QuantizeResult, keep: bool) -> nn.Module:
    old = get_module(model, name)
    bias = getattr(old, "bias", None)
    bias = None if bias is None else bias.detach().float().clone()
    new = build_linear(rec, bias, act, opts.use_kernel)
    set_module(model, name, new)
    if keep:
        result.records[name] = rec
        result.biases[name] = bias
    return new


def float_weight(model, name: str) -> torch.Tensor:
    """The float weight of the linear at `name` (a TokenloomError if it is no longer a float Linear)."""
    mod = get_module(model, name)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TokenloomError(f"'{name}' is a {type(mod).__name__}, not a float Linear: quantize the model right "
                             "after loading (LLM(..., quantization=...)), before it is quantized or packed")
    return w.detach()


def layer_iter(model, desc: str, progress: bool):
    layers = list(enumerate(model.layers))
    if progress:
        from tqdm import tqdm

        return tqdm(layers, desc=desc, unit="layer", file=sys.stderr)
    return layers


def rtn_quantize_model(model, opts, act, result, progress=False, keep=False) -> None:
    for i, layer in layer_iter(model, f"{opts.method} quantize", progress):
        for lname in LINEAR_NAMES:
            name = f"layers.{i}.{lname}"
            if lname.startswith("mlp.") and is_moe(layer):
                continue
            swap_linear(model, name, quantize_weight(float_weight(model, name), opts), act, opts, result, keep)
        if is_moe(layer):
            quantize_moe(model, i, opts, act, result, keep)


def is_moe(layer) -> bool:
    return isinstance(layer.mlp, SparseMoE)


def quantize_moe(model, i: int, opts, act, result, keep) -> None:
    """Mixtral experts: each expert's w13 / w2 quantized with the RTN form of the method (GPTQ / AWQ included,
    since their calibration is per dense linear), the router kept in float."""
    moe = model.layers[i].mlp
    rtn = opts if opts.method in ("int8", "int4", "nf4") else QuantOptions(
        method="int4", bits=opts.bits, group_size=opts.group_size, sym=opts.sym, use_kernel=opts.use_kernel)
    w13, w2 = [], []
    for e in range(moe.num_experts):
        for src, dst, tag in ((moe.experts_w13, w13, "w13"), (moe.experts_w2, w2, "w2")):
            rec = quantize_weight(src[e].detach(), rtn)
            dst.append(build_linear(rec, None, act, opts.use_kernel))
            if keep:
                result.records[f"layers.{i}.mlp.experts.{e}.{tag}"] = rec
    model.layers[i].mlp = QuantSparseMoE(moe, w13, w2)


def quantize_lm_head(model, opts: QuantOptions, act, result: QuantizeResult, keep=False) -> None:
    """INT8 (or the method's RTN form) for the LM head; a tied embedding then reads rows from it."""
    if opts.lm_head == "none":
        return
    head = model.lm_head
    if not (isinstance(head, Linear) and head.holds_float_weight):
        return  # already quantized (or packed)
    w = head.weight.detach()
    if opts.lm_head == "int8" or opts.method in ("gptq", "awq"):
        rec = quantize_int8(w) if opts.lm_head == "int8" else quantize_weight(
            w, QuantOptions(method="int4", bits=opts.bits, group_size=opts.group_size, sym=opts.sym))
    else:
        rec = quantize_weight(w, opts)
    new = build_linear(rec, None, act, opts.use_kernel)
    tied = model.config.tie_word_embeddings and head.weight is model.embed_tokens.weight
    model.lm_head = new
    if tied:
        model.embed_tokens = QuantizedEmbedding(new, model_dtype(model))
    if keep:
        result.records["lm_head"] = rec
        result.extra["lm_head"] = opts.lm_head
