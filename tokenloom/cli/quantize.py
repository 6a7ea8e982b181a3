"""`tokenloom quantize MODEL --method ... --out DIR`: quantize a model and write a directory that loads."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tokenloom.config import TokenloomError


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights and write a directory that loads with --model")
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--method", "-m", required=True, choices=["int8", "int4", "gptq", "awq", "nf4"])
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--bits", type=int, default=0, help="int4/gptq: 2..8 (default 4); awq: 4")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale (int4/gptq/awq; -1 = per row)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (int4/gptq)")
    p.add_argument("--no-act-order", action="store_true", help="gptq: keep the natural column order")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: dampening (fraction of mean diag H)")
    p.add_argument("--block-size", type=int, default=64, help="nf4: weights per absmax")
    p.add_argument("--double-quant", action="store_true", help="nf4: quantize the absmax values too")
    p.add_argument("--lm-head", default="int8", choices=["int8", "same", "none"],
                   help="LM head at load: int8 per channel (default), the method itself, or float")
    p.add_argument("--calib", default=None, help="calibration text file (default: the corpus' calibration part)")
    p.add_argument("--corpus", default="moby-dick", help="calibration corpus: moby-dick or sotu")
    p.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--dtype", default="float32", help="dtype the model is calibrated in (default float32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=quantize_command)


def quantize_command(args) -> None:
    import torch

    from tokenloom.config import resolve_dtype
    from tokenloom.worker.model_loading import load_model
    from tokenloom.loader.sources import resolve_model
    from tokenloom.quant import QuantOptions, quantize_model
    from tokenloom.quant.checkpoint import save_quantized
    from tokenloom.quant.linear import weight_bytes

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise TokenloomError(f"output directory '{out}' is not empty")
    opts = QuantOptions(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                        act_order=not args.no_act_order, damp=args.damp, block_size=args.block_size,
                        double_quant=args.double_quant, lm_head="none", n_samples=args.n_samples,
                        seq_len=args.seq_len, calib=args.calib, corpus=args.corpus, seed=args.seed)
    dtype = resolve_dtype(args.dtype)
    source = resolve_model(args.model)
    t0 = time.perf_counter()
    model, tokenizer = load_model(source, dtype, torch.device("cpu"))
    before = weight_bytes(model)
    print(f"loaded {source.name} ({before / 1e6:.1f} MB in {str(dtype).removeprefix('torch.')}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if opts.method in ("gptq", "awq") and tokenizer is None:
        raise TokenloomError(f"{opts.method} calibrates on text, but this model has no tokenizer")
    result = quantize_model(model, opts, tokenizer=tokenizer, progress=True, return_records=True)
    result.options.lm_head = args.lm_head
    path = save_quantized(model, result, out, tokenizer)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    extra = ""
    if "calibration_tokens" in result.extra:
        extra = f", calibrated on {result.extra['calibration_tokens']} tokens"
    print(f"{opts.method}: quantized {len(result.records)} linear layers in {result.seconds:.1f} s{extra}")
    print(f"wrote {path} ({size / 1e6:.1f} MB); run it with: tokenloom generate --model {path} ... "
          f"or tokenloom run {path}")
