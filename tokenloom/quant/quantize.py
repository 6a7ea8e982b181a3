"""quantize_model: one entry point for every method (RTN int8/int4/nf4, calibrated GPTQ/AWQ, GGUF blocks)."""
from __future__ import annotations

import dataclasses
import time

import torch

from tokenloom.config import TokenloomError
from tokenloom.quant.kernels import kernel_act_dtype
from tokenloom.quant.modules import model_dtype, quantize_lm_head, rtn_quantize_model
from tokenloom.quant.options import QuantizeResult, QuantOptions, parse_method


def quantize_model(model, method: str | QuantOptions = "int8", *, tokenizer=None, calib_samples=None,
                   gguf_path=None, act_dtype: torch.dtype | None = None, progress: bool = False,
                   return_records: bool = False, tp_plan=None, **options) -> QuantizeResult:
    """Quantize `model` in place (module swaps). Returns what was done (and the records when asked)."""
    if isinstance(method, QuantOptions):
        opts = method
    else:
        name, parsed = parse_method(method)
        parsed.update({k: v for k, v in options.items() if v is not None})
        opts = QuantOptions(method=name, **parsed)
    dtype = model_dtype(model)
    device = model.norm.weight.device
    if device.type != "cpu" and opts.use_kernel:  # the kernels (tokenloom's gemv, torch's int8/int4 packs) are CPU
        opts = dataclasses.replace(opts, use_kernel=False)  # ones: elsewhere dequantize + F.linear
    act = act_dtype or kernel_act_dtype(dtype, device)
    start = time.perf_counter()
    result = QuantizeResult(opts, 0.0)
    with torch.no_grad():
        if opts.method == "gguf":
            from tokenloom.quant.gguf_linear import quantize_model_gguf

            if gguf_path is None:
                raise TokenloomError("gguf: keeping GGUF blocks quantized needs the model's .gguf file "
                                     "(quantize_model(..., gguf_path=...))")
            result.extra = quantize_model_gguf(model, gguf_path, act, opts.use_kernel, progress=progress,
                                               tp_plan=tp_plan)
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
            rtn_quantize_model(model, opts, act, result, progress=progress, keep=return_records)
        if opts.method != "gguf":
            quantize_lm_head(model, opts, act, result, keep=return_records)
    result.seconds = time.perf_counter() - start
    return result
