"""The economics section of every bench report (bytes and FLOPs per token of the model as loaded, the share of
this machine's roofs a measured rate reaches, cost per 1M tokens), and `tokenloom bench roofline`: the roofs
measured afresh, then the model's decode (batch 1 and a wider batch) and prefill against them.
"""
from __future__ import annotations

import torch

from tokenloom.bench import economics as E
from tokenloom.bench.hardware import price_from_args
from tokenloom.bench.roofline import machine_roofs


def _tensors(mod):
    out = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
    out += [(k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor) and not k.startswith("_")]
    return out


def _key(t: torch.Tensor):
    if t.is_mkldnn or t.layout != torch.strided:
        return ("opaque", id(t)), t.numel() * t.element_size()
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()), t.untyped_storage().nbytes()


def _storage_keys(mod) -> set:
    return {_key(t)[0] for m in mod.modules() for _, t in _tensors(m) if t is not None}


def loaded_step_bytes(engine, batch: int = 1) -> float:
    """Weight bytes one decode step of `batch` tokens reads from the model as loaded: every stored tensor (each
    storage once; quantized blocks, records and their scales as they are), but one embedding row per token unless
    the LM head reads the table (tied), the experts the batch routes to (MoE), and block scales at float16 where
    the compiled decode stack reads them so (it keeps float16 copies of the ggml formats' exact scales)."""
    model, cfg = getattr(engine, "model", None), engine.model_config
    if model is None:  # the weights live in worker processes: the analytic count in the engine's dtype
        return E.decode_weight_bytes(cfg, str(engine.dtype).removeprefix("torch."), batch)
    fused = getattr(getattr(engine, "runner", None), "fused", None)
    f16_scales = fused is not None and any("+f16" in k for k in fused.kernels)
    embed = getattr(model, "embed_tokens", None)
    embed_keys = _storage_keys(embed) if embed is not None else set()
    head = getattr(model, "lm_head", None)
    head_keys = _storage_keys(head) if head is not None else set()
    touched = E.expected_experts_touched(cfg.num_experts, cfg.num_experts_per_tok, batch) / max(cfg.num_experts, 1)
    seen, total = set(), 0.0
    for mod_name, mod in model.named_modules():
        for name, t in _tensors(mod):
            full = f"{mod_name}.{name}"
            if t is None or "rotary" in full or full.endswith((".lut", ".code")):
                continue
            key, size = _key(t)
            if key in seen:
                continue
            seen.add(key)
            if key in embed_keys and key not in head_keys:
                size = size / cfg.vocab_size * batch  # the tokens' rows only
            elif "experts" in full:
                size *= touched
            elif f16_scales and name in ("scale", "offset") and t.dtype == torch.float32 \
                    and getattr(mod, "kernel", None) == "gemv":
                size /= 2
            total += size
    return total


def kv_dtype_of(engine) -> str:
    if engine.config.cache.kv_cache_dtype == "int8":
        return "int8"
    return str(engine.dtype).removeprefix("torch.")


def section(engine, args, *, decode: dict | None = None, prefill: dict | None = None,
            cost_tok_s: float | None = None, cost_what: str = "output tokens", step_bytes: float | None = None,
            show: bool = True) -> dict:
    """The economics of a bench run on `engine`. decode: {tok_s (all sequences), batch, ctx}; prefill: {tok_s,
    prompt_len}; cost_tok_s: the rate the price is spread over (default: decode's); step_bytes: the weight bytes a
    step reads where the engine's own model is not all of them (the ranks of a split model); show: print it."""
    roofs, raw = machine_roofs()
    cfg, dtype = engine.model_config, str(engine.dtype).removeprefix("torch.")
    kv_dtype = kv_dtype_of(engine)
    out = {"roofs": {**roofs.to_dict(), "copy_bandwidth": raw.get("copy_bandwidth"), "threads": raw.get("threads")},
           "kv_bytes_per_token_stored": E.kv_bytes_per_token(cfg, kv_dtype)}
    if decode:
        b, ctx = max(1, int(decode["batch"])), int(decode["ctx"])
        w = step_bytes if step_bytes is not None else loaded_step_bytes(engine, b)
        kv = E.kv_bytes_read(cfg, ctx, kv_dtype)
        d = E.shares(roofs, dtype, w / b + kv, E.decode_flops_per_token(cfg, ctx), decode["tok_s"])
        out["decode"] = {"batch": b, "ctx": ctx, "weight_bytes_per_step": w, "kv_bytes_per_token": kv, **d,
                         "weights_fit_in_llc": bool(roofs.llc_bytes and w < roofs.llc_bytes)}
    if prefill:
        p = max(1, int(prefill["prompt_len"]))
        w = step_bytes if step_bytes is not None else loaded_step_bytes(engine, 1)
        out["prefill"] = {"prompt_len": p, **E.shares(roofs, dtype, w / p, E.prefill_flops(cfg, p) / p,
                                                      prefill["tok_s"])}
    price, source = price_from_args(args)
    rate = cost_tok_s if cost_tok_s is not None else (decode or {}).get("tok_s", 0.0)
    out["cost"] = {"price_per_hour": price, "price_source": source, "tok_s": rate, "per": cost_what,
                   "usd_per_million_tokens": E.cost_per_million(price, rate)}
    if show:
        print_section(out, dtype)
    return out


def print_section(sec: dict, dtype: str) -> None:
    r = sec["roofs"]
    gemm = r["gemm_fp32"] if dtype == "float32" else r["gemm_bf16"]
    print(f"economics   roofs: read {r['bandwidth'] / 1e9:.1f} GB/s, {'fp32' if dtype == 'float32' else 'bf16'} GEMM "
          f"{gemm / 1e12:.2f} TFLOP/s ({r['source']}; `tokenloom bench roofline` measures again)")
    if d := sec.get("decode"):
        llc = "  (weights fit in the last-level cache: the DRAM roof does not bind)" if d["weights_fit_in_llc"] else ""
        print(f"  decode    batch {d['batch']}, context {d['ctx']}: {d['weight_bytes_per_step'] / d['batch'] / 1e6:.1f}"
              f" MB weights + {d['kv_bytes_per_token'] / 1e6:.2f} MB KV per token -> {d['achieved_bandwidth_gbs']:.1f}"
              f" GB/s = {d['bandwidth_share'] * 100:.0f} % of bandwidth{llc}")
        print(f"            {d['flops_per_token'] / 1e9:.3f} GFLOP per token -> {d['achieved_tflops'] * 1e3:.1f} "
              f"GFLOP/s = {d['gemm_share'] * 100:.1f} % of GEMM")
    if p := sec.get("prefill"):
        print(f"  prefill   prompt {p['prompt_len']}: {p['flops_per_token'] / 1e9:.3f} GFLOP per token -> "
              f"{p['achieved_tflops'] * 1e3:.1f} GFLOP/s = {p['gemm_share'] * 100:.1f} % of GEMM")
    c = sec["cost"]
    if c["usd_per_million_tokens"] is None:
        print("  cost      give --price-per-hour or --instance NAME for $ per 1M tokens")
    else:
        print(f"  cost      {c['price_source']} at {c['tok_s']:.1f} tok/s -> ${c['usd_per_million_tokens']:.4g} "
              f"per 1M {c['per']}")


def _decode_rate(llm, prompts: list[list[int]], output_len: int) -> float:
    """Tokens/s of all sequences together while they decode side by side (after each one's first token)."""
    from tokenloom.sampling_params import SamplingParams

    eng = llm.engine
    eng.reset_prefix_cache()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    step = sum((o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
               for o in outs) / len(outs)
    return len(prompts) / step


def bench_roofline(args) -> dict:
    """`tokenloom bench roofline`: this machine's roofs measured now, then the model against them."""
    from tokenloom.bench.common import random_prompts
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.sampling_params import SamplingParams

    llm = make_llm(args)  # sets the threads first, so the roofs are measured with the model's
    eng = llm.engine
    print(f"measuring the roofs with {torch.get_num_threads()} threads ...", flush=True)
    roofs, raw = machine_roofs(refresh=True, buffer=args.buffer)
    print(f"machine    {raw['cpu']}, {raw['threads']} threads, last-level cache {raw['llc_bytes'] / 2 ** 20:.0f} MiB")
    last = raw["last"]
    print(f"memory     read {last['read_bandwidth'] / 1e9:.1f} GB/s, copy {last['copy_bandwidth'] / 1e9:.1f} GB/s "
          f"(read + write; {raw['buffer_bytes'] / 2 ** 30:.2f} GiB buffers)   best seen here: read "
          f"{raw['read_bandwidth'] / 1e9:.1f} GB/s")
    print(f"GEMM       bf16 {last['gemm_bf16'] / 1e12:.3f} TFLOP/s (n={raw['gemm_bf16_size']}), fp32 "
          f"{last['gemm_fp32'] / 1e12:.3f} TFLOP/s (n={raw['gemm_fp32_size']})   best seen here: bf16 "
          f"{raw['gemm_bf16'] / 1e12:.3f}, fp32 {raw['gemm_fp32'] / 1e12:.3f}")
    prompts = random_prompts([(args.input_len, args.output_len)] * max(args.batch, 1),
                             eng.model_config.vocab_size, args.seed)
    llm.generate(prompts[0][:16], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    ttft, rate1 = float("inf"), 0.0
    for _ in range(args.num_iters):  # best round: noise only ever slows a run down
        eng.reset_prefix_cache()
        o = llm.generate(prompts[0], SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True))[0]
        ttft = min(ttft, o.metrics.ttft)
        rate1 = max(rate1, o.decode_tokens_per_s)
    rate_b = max(_decode_rate(llm, prompts, args.output_len) for _ in range(args.num_iters))
    ctx = args.input_len + args.output_len // 2
    print(f"model      {eng.model_name}  dtype {str(eng.dtype).removeprefix('torch.')}  weights "
          f"{eng.config.quantization or 'float'}  prompt {args.input_len}  output {args.output_len}")
    print(f"measured   prefill {args.input_len / ttft:.1f} tok/s   decode batch 1 {rate1:.1f} tok/s   "
          f"batch {args.batch} {rate_b:.1f} tok/s")
    one = section(eng, args, decode={"tok_s": rate1, "batch": 1, "ctx": ctx},
                  prefill={"tok_s": args.input_len / ttft, "prompt_len": args.input_len})
    wide = section(eng, args, decode={"tok_s": rate_b, "batch": args.batch, "ctx": ctx})
    return {"machine": raw, "model": eng.model_name, "prefill_tok_s": args.input_len / ttft, "decode_tok_s": rate1,
            "batch": args.batch, "decode_tok_s_batch": rate_b, "economics": one, "economics_batch": wide}


def config_from_show(show: dict):
    """The architecture numbers a server's /api/show gives (Ollama's model_info keys) as a ModelConfig, and the
    model's size in bytes; (None, 0) where it gives too little."""
    from tokenloom.config import ModelConfig, TokenloomError

    info = (show or {}).get("model_info") or {}
    arch = info.get("general.architecture")
    try:
        cfg = ModelConfig(architecture=arch, vocab_size=int(info[f"{arch}.vocab_size"]),
                          hidden_size=int(info[f"{arch}.embedding_length"]),
                          intermediate_size=int(info[f"{arch}.feed_forward_length"]),
                          num_layers=int(info[f"{arch}.block_count"]),
                          num_heads=int(info[f"{arch}.attention.head_count"]),
                          num_kv_heads=int(info[f"{arch}.attention.head_count_kv"]),
                          head_dim=int(info.get(f"{arch}.attention.key_length") or 0))
    except (KeyError, TypeError, ValueError, TokenloomError):
        return None, 0.0
    return cfg, float(show.get("size") or 0)


def remote_section(args, show: dict, out_tok_s: float, in_flight: float, ctx: int) -> dict:
    """The economics of a load test over HTTP: cost at the measured output rate, and, where the server says what
    its model is (/api/show), bytes and FLOPs per token against this machine's roofs (the server's, when it runs
    here): weights = the model's size, read once per step of a batch of the requests in flight (Little's law:
    req/s x mean latency), KV in bf16."""
    cfg, size = config_from_show(show)
    return model_section(args, cfg, size, out_tok_s, in_flight, ctx)


def model_section(args, cfg, weight_bytes: float, out_tok_s: float, batch: float, ctx: int,
                  show: bool = True) -> dict:
    """The economics of a model known by its architecture (cfg, or None) and stored size, not loaded here:
    weights read once per step of `batch` sequences, KV in bf16; cost at out_tok_s."""
    roofs, raw = machine_roofs()
    out = {"roofs": {**roofs.to_dict(), "copy_bandwidth": raw.get("copy_bandwidth"), "threads": raw.get("threads")}}
    if cfg is not None and weight_bytes and out_tok_s > 0:
        batch = max(1.0, batch)
        kv = E.kv_bytes_read(cfg, ctx, "bf16")
        d = E.shares(roofs, "bfloat16", weight_bytes / batch + kv, E.decode_flops_per_token(cfg, ctx), out_tok_s)
        out["decode"] = {"batch": round(batch, 1), "ctx": ctx, "weight_bytes_per_step": weight_bytes,
                         "kv_bytes_per_token": kv, **d,
                         "weights_fit_in_llc": bool(roofs.llc_bytes and weight_bytes < roofs.llc_bytes)}
    price, source = price_from_args(args)
    out["cost"] = {"price_per_hour": price, "price_source": source, "tok_s": out_tok_s, "per": "output tokens",
                   "usd_per_million_tokens": E.cost_per_million(price, out_tok_s)}
    if show:
        print_section(out, "bfloat16")
    return out
