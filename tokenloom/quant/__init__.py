"""Weight quantization: INT8, INT4, GPTQ, AWQ, NF4 and native GGUF blocks, swapped into a loaded model.

    from tokenloom.quant import quantize_model
    quantize_model(model, "int8")                         # W8A16, per output channel
    quantize_model(model, "int4", group_size=64)          # group-wise asymmetric RTN
    quantize_model(model, "gptq", tokenizer=tok)          # calibrated on the corpus (see calib.py)
    quantize_model(model, "gguf", gguf_path=path)         # keep the GGUF file's blocks quantized

Method strings may carry options: "int4-g64", "gptq-b3-g128", "nf4-dq" (double quantization).
Every nn.Linear of the decoder layers (fused q/k/v, o, fused gate/up, down) is replaced by a quantized module of
tokenloom.quant.linear; the LM head is quantized to INT8 per channel by default (`lm_head="int8"`; "same" uses the
method itself, "none" keeps it), and when it is tied to the token embedding the embedding reads its rows from the
quantized head, so the big vocabulary matrix exists once.

Kernels (see linear.py): tokenloom's AVX-512 GEMV kernels (cpu_kernels.py, compiled on first use) when they
build, else torch's aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, else dequantize + F.linear; prefill
(64+ rows) dequantizes the weight once and uses the BLAS matmul. TOKENLOOM_QUANT_REFERENCE=1 forces the
reference path everywhere; TOKENLOOM_CPP_KERNELS=0 skips the compiled kernels.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenloom.config import TokenloomError

METHODS = ("int8", "int4", "gptq", "awq", "nf4", "gguf")
LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass
class QuantOptions:
    method: str = "int8"
    bits: int = 0  # 0 = the method's default (8 for int8, 4 otherwise)
    group_size: int = 128  # int4 / gptq / awq; -1 = one group per row
    sym: bool = False  # symmetric grid (zero point 2^(bits-1)) for int4 / gptq
    act_order: bool = True  # gptq: quantize columns in decreasing Hessian diagonal order
    damp: float = 0.01  # gptq: dampening, fraction of the mean Hessian diagonal
    block_size: int = 64  # nf4 absmax block
    double_quant: bool = False  # nf4
    lm_head: str = "int8"  # int8 | same | none
    n_samples: int = 128  # calibration windows (gptq / awq)
    seq_len: int = 256  # tokens per calibration window
    calib: str | None = None  # calibration text file (default: the corpus' calibration part)
    corpus: str = "moby-dick"
    seed: int = 0
    awq_grid: int = 20
    use_kernel: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise TokenloomError(f"unknown quantization method '{self.method}' (choose from: {', '.join(METHODS)})")
        if not self.bits:
            self.bits = 8 if self.method == "int8" else 4
        if self.method in ("int4", "gptq", "awq") and self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise TokenloomError(f"{self.method}: bits must be 2..8, got {self.bits}")
        if self.method == "awq" and self.bits != 4:
            raise TokenloomError("awq: only 4-bit is supported (the AutoAWQ GEMM format)")
        if self.method == "int8" and self.bits != 8:
            raise TokenloomError("int8: bits must be 8 (use int4 --bits N for other widths)")
        if self.group_size == 0 or self.group_size < -1:
            raise TokenloomError("group_size must be positive or -1 (per row)")
        if self.lm_head not in ("int8", "same", "none"):
            raise TokenloomError(f"lm_head must be int8, same or none, got '{self.lm_head}'")


def parse_method(spec: str) -> tuple[str, dict]:
    """"int4-g64" -> ("int4", {"group_size": 64}); "gptq-b3" -> ("gptq", {"bits": 3}); "nf4-dq"."""
    parts = spec.strip().lower().replace(":", "-").split("-")
    method, opts = parts[0], {}
    for p in parts[1:]:
        if m := re.fullmatch(r"g(\d+)", p):
            opts["group_size"] = int(m.group(1))
        elif m := re.fullmatch(r"b(\d+)|(\d+)bit", p):
            opts["bits"] = int(m.group(1) or m.group(2))
        elif p == "dq":
            opts["double_quant"] = True
        elif p == "sym":
            opts["sym"] = True
        elif p == "noact":
            opts["act_order"] = False
        elif p:
            raise TokenloomError(f"cannot parse quantization option '{p}' in '{spec}'")
    return method, opts


@dataclass
class QuantizeResult:
    options: QuantOptions
    seconds: float
    records: dict = field(default_factory=dict)  # module path -> record (kept when return_records=True)
    biases: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


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


def quantize_model(model, method: str | QuantOptions = "int8", *, tokenizer=None, calib_samples=None,
                   gguf_path=None, act_dtype: torch.dtype | None = None, progress: bool = False,
                   return_records: bool = False, **options) -> QuantizeResult:
    """Quantize `model` in place (module swaps). Returns what was done (and the records when asked)."""
    from tokenloom.quant.kernels import kernel_act_dtype

    if isinstance(method, QuantOptions):
        opts = method
    else:
        name, parsed = parse_method(method)
        parsed.update({k: v for k, v in options.items() if v is not None})
        opts = QuantOptions(method=name, **parsed)
    dtype = model_dtype(model)
    device = model.norm.weight.device
    act = act_dtype or kernel_act_dtype(dtype, device)
    start = time.perf_counter()
    result = QuantizeResult(opts, 0.0)
    with torch.no_grad():
        if opts.method == "gguf":
            from tokenloom.quant.gguf_linear import quantize_model_gguf

            path = gguf_path or getattr(model, "gguf_path", None)
            if path is None:
                raise TokenloomError("gguf: keeping GGUF blocks quantized needs the model's .gguf file "
                                     "(quantize_model(..., gguf_path=...))")
            result.extra = quantize_model_gguf(model, path, act, opts.use_kernel, progress=progress)
        elif opts.method in ("gptq", "awq"):
            if calib_samples is None:
                if tokenizer is None:
                    raise TokenloomError(f"{opts.method} needs calibration text: pass a tokenizer (or calib_samples)")
                from tokenloom.quant.calib import load_calibration

                calib_samples = load_calibration(tokenizer, opts.calib, opts.n_samples, opts.seq_len, opts.seed,
                                                 opts.corpus)
            if opts.method == "gptq":
                from tokenloom.quant.gptq import gptq_quantize_model as run
            else:
                from tokenloom.quant.awq import awq_quantize_model as run
            run(model, calib_samples, opts, act, result, progress=progress, keep=return_records)
        else:
            _rtn_quantize_model(model, opts, act, result, progress=progress, keep=return_records)
        if opts.method != "gguf":
            quantize_lm_head(model, opts, act, result, keep=return_records)
    result.seconds = time.perf_counter() - start
    return result


def quantize_weight(w: torch.Tensor, opts: QuantOptions):
    """The record of one float weight [N, K] under the RTN-type methods."""
    from tokenloom.quant.nf4 import quantize_nf4
    from tokenloom.quant.rtn import quantize_affine, quantize_int8

    if opts.method == "int8":
        return quantize_int8(w)
    if opts.method == "nf4":
        return quantize_nf4(w, opts.block_size, opts.double_quant)
    return quantize_affine(w, opts.bits, opts.group_size, opts.sym)


def swap_linear(model, name: str, rec, act, opts: QuantOptions, result: QuantizeResult, keep: bool) -> nn.Module:
    from tokenloom.quant.linear import build_linear

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
    """The float weight of the linear at `name` (a TokenloomError if it is no longer a plain nn.Linear)."""
    mod = get_module(model, name)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TokenloomError(f"'{name}' is a {type(mod).__name__}, not a float nn.Linear: quantize the model right "
                             "after loading (LLM(..., quantization=...)), before it is quantized or packed")
    return w.detach()


def _layer_iter(model, desc: str, progress: bool):
    layers = list(enumerate(model.layers))
    if progress:
        from tqdm import tqdm

        return tqdm(layers, desc=desc, unit="layer", file=sys.stderr)
    return layers


def _rtn_quantize_model(model, opts, act, result, progress=False, keep=False) -> None:
    for i, layer in _layer_iter(model, f"{opts.method} quantize", progress):
        for lname in LINEAR_NAMES:
            name = f"layers.{i}.{lname}"
            if lname.startswith("mlp.") and is_moe(layer):
                continue
            swap_linear(model, name, quantize_weight(float_weight(model, name), opts), act, opts, result, keep)
        if is_moe(layer):
            quantize_moe(model, i, opts, act, result, keep)


def is_moe(layer) -> bool:
    from tokenloom.layers.moe import SparseMoE

    return isinstance(layer.mlp, SparseMoE)


def quantize_moe(model, i: int, opts, act, result, keep) -> None:
    """Mixtral experts: each expert's w13 / w2 quantized with the RTN form of the method (GPTQ / AWQ included,
    since their calibration is per dense linear), the router kept in float."""
    from tokenloom.quant.linear import build_linear
    from tokenloom.quant.moe import QuantSparseMoE

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
    model.layers[i].mlp = QuantSparseMoE(moe.gate, w13, w2, moe.top_k)


def quantize_lm_head(model, opts: QuantOptions, act, result: QuantizeResult, keep=False) -> None:
    """INT8 (or the method's RTN form) for the LM head; a tied embedding then reads rows from it."""
    from tokenloom.quant.linear import QuantizedEmbedding, build_linear

    if opts.lm_head == "none":
        return
    head = model.lm_head
    if not isinstance(head, nn.Linear):
        return  # already quantized (or packed)
    w = head.weight.detach()
    if opts.lm_head == "int8" or opts.method in ("gptq", "awq"):
        from tokenloom.quant.rtn import quantize_int8

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
