"""`tokenloom bench quant MODEL`: quality, speed and memory of every quantization method, in one run.

For the original weights (in float32 and in the runtime dtype) and each method it reports weight bytes, peak
RSS, perplexity on held-out text (the corpus' evaluation part; calibration uses the disjoint first part),
Δppl against the original weights in the runtime dtype, and batch-1 prefill / decode tokens/s, plus a
greedy sample per model. Each step runs in its own subprocess:

  1. int8 / int4 / gptq / awq / nf4 are quantized (float32 calibration) and written as checkpoint directories
     under OUT/checkpoints, exactly as `tokenloom quantize` does;
  2. each row loads its model -- the original GGUF, a checkpoint directory through the regular loader, or the
     GGUF with its blocks kept quantized (gguf) -- alone in a process, so its peak RSS is its own; then weight
     bytes, perplexity and a greedy sample;
  3. speed: one process holds every row's model and times them round-robin (best of --rounds), so load from
     other processes on the machine hits every row alike.

Writes OUT/quant_bench.md (table + samples), OUT/quant_bench.json, OUT/quant_bench.png (bars) and
OUT/quant_quality_speed.png (Δ perplexity against decode tok/s), and prints each method's economics.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULT = "QUANT-BENCH-RESULT "
SAMPLE_PROMPT = "Write two sentences about the ocean."


def _rss_now() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------
# workers (run in subprocesses)


def _worker_quantize(job: dict) -> dict:
    import torch

    from tokenloom.worker.model_loading import load_model
    from tokenloom.loader.sources import resolve_model
    from tokenloom.quant import QuantOptions, quantize_model
    from tokenloom.quant.checkpoint import save_quantized

    source = resolve_model(job["model"])
    model, tok = load_model(source, torch.float32, torch.device("cpu"))
    opts = QuantOptions(method=job["method"], group_size=job["group_size"], lm_head="none",
                        n_samples=job["n_samples"], seq_len=job["seq_len"], corpus=job["corpus"],
                        double_quant=job.get("double_quant", False))
    res = quantize_model(model, opts, tokenizer=tok, progress=True, return_records=True)
    res.options.lm_head = job["lm_head"]
    save_quantized(model, res, job["out"], tok)
    return {"seconds": res.seconds, "calibration_tokens": res.extra.get("calibration_tokens", 0)}


def _worker_measure(job: dict) -> dict:
    import torch

    from tokenloom.entrypoints.llm import LLM
    from tokenloom.quant import quantize_model
    from tokenloom.quant.calib import evaluation_tokens
    from tokenloom.eval.perplexity import perplexity
    from tokenloom.quant.linear import weight_bytes
    from tokenloom.sampling_params import SamplingParams

    t0 = time.perf_counter()
    max_len = max(job["window"], job["input_len"] + job["output_len"]) + 64
    llm = LLM(job["model"], dtype=job["dtype"], max_model_len=max_len, max_num_seqs=4, kv_cache_memory=256 << 20)
    eng = llm.engine
    if job.get("gguf"):
        quantize_model(eng.model, "gguf", gguf_path=eng.model_source.path)
    import gc

    gc.collect()
    load_s = time.perf_counter() - t0
    from tokenloom.bench.token_economics import loaded_step_bytes

    out = {"weight_bytes": weight_bytes(eng.model), "rss_loaded": _rss_now(), "load_s": load_s,
           "decode_bytes_per_step": loaded_step_bytes(eng, 1),
           "dtype": str(eng.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    kinds = {}
    for m in eng.model.modules():
        k = getattr(m, "kernel", None)
        if isinstance(k, str):
            kinds[k] = kinds.get(k, 0) + 1
    out["kernels"] = kinds

    # peak RSS includes running the model (a short generation), not the perplexity pass below
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, eng.model_config.vocab_size, (job["input_len"],), generator=g).tolist()
    llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    out["peak_rss"] = _peak_rss()

    # greedy sample
    if llm.tokenizer is not None:
        ids = llm.chat_prompt_ids([{"role": "user", "content": SAMPLE_PROMPT}])
        o = llm.generate(ids, SamplingParams(max_tokens=job["sample_tokens"], temperature=0.0))[0]
        out["sample"] = o.outputs[0].text
        # perplexity on the held-out part of the corpus
        toks = evaluation_tokens(llm.tokenizer, job["eval_tokens"], corpus=job["corpus"])
        r = perplexity(eng.model, toks, job["window"], job["stride"])
        out.update(ppl=r.ppl, eval_tokens=r.tokens, eval_s=r.seconds)
    return out


def _load_for_speed(row: dict, max_len: int):
    from tokenloom.entrypoints.llm import LLM
    from tokenloom.quant import quantize_model

    llm = LLM(row["model"], dtype=row["dtype"], max_model_len=max_len, max_num_seqs=4, kv_cache_memory=256 << 20)
    if row.get("gguf"):
        quantize_model(llm.engine.model, "gguf", gguf_path=llm.engine.model_source.path)
    return llm


def _worker_speed(job: dict) -> dict:
    """All rows' models in one process, measured round-robin (best of the rounds), so that load from other
    processes on the machine hits every row alike."""
    import torch

    from tokenloom.sampling_params import SamplingParams

    max_len = job["input_len"] + job["output_len"] + 64
    llms = {row["label"]: _load_for_speed(row, max_len) for row in job["rows"]}
    vocab = next(iter(llms.values())).engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, vocab, (job["input_len"],), generator=g).tolist()
    params = SamplingParams(max_tokens=job["output_len"], temperature=0.0, ignore_eos=True)
    for llm in llms.values():  # warm-up
        llm.generate(prompt[:16], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    ttfts = {k: [] for k in llms}
    rates = {k: [] for k in llms}
    for _ in range(job["rounds"]):
        for label, llm in llms.items():
            llm.engine.reset_prefix_cache()  # a cold prefill every time
            o = llm.generate(prompt, params)[0]
            ttfts[label].append(o.metrics.ttft)
            rates[label].append(o.decode_tokens_per_s)
    return {label: {"prefill_tok_s": job["input_len"] / min(ttfts[label]), "decode_tok_s": max(rates[label]),
                    "decode_tok_s_all": rates[label], "threads": torch.get_num_threads()} for label in llms}


def _worker_main(argv: list[str]) -> None:
    job = json.loads(argv[0])
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])
    fn = {"quantize": _worker_quantize, "measure": _worker_measure, "speed": _worker_speed}[job["kind"]]
    result = fn(job)
    print(RESULT + json.dumps(result), flush=True)


def _run_worker(job: dict, label: str) -> dict:
    cmd = [sys.executable, "-m", "tokenloom.bench.quant", json.dumps(job)]
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "5")
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        print(f"  {label}: failed (exit {proc.returncode}) {tail}", file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    res = json.loads(lines[-1][len(RESULT):])
    res["wall_s"] = time.perf_counter() - start
    return res


# ---------------------------------------------------------------------------------------------------------
# the command


def bench_quant(args) -> dict:
    from tokenloom.config import resolve_dtype
    from tokenloom.loader.sources import resolve_model

    source = resolve_model(args.model)
    out = Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"int8", "int4", "gptq", "awq", "nf4", "gguf"}
    if unknown:
        from tokenloom.config import TokenloomError

        raise TokenloomError(f"unknown method(s): {', '.join(sorted(unknown))}")
    if "gguf" in methods and source.kind != "gguf":
        methods.remove("gguf")
    threads = args.threads or 0
    group = args.group_size
    common = dict(threads=threads, corpus=args.corpus)
    print(f"bench quant: {source.name}, runtime dtype {dtype}, methods {', '.join(methods)}, group size {group}, "
          f"threads {threads or 'default'}", file=sys.stderr)

    quant_info = {}
    for m in methods:
        if m == "gguf":
            continue
        ckpt = out / "checkpoints" / m
        if (ckpt / "config.json").is_file() and not args.requantize:
            print(f"[quantize] {m}: reusing {ckpt}", file=sys.stderr)
            quant_info[m] = json.loads((ckpt / "bench_quantize.json").read_text()) \
                if (ckpt / "bench_quantize.json").is_file() else {}
            continue
        print(f"[quantize] {m} ...", file=sys.stderr)
        if ckpt.exists():
            import shutil

            shutil.rmtree(ckpt)
        job = dict(kind="quantize", model=args.model, method=m, out=str(ckpt), group_size=group,
                   n_samples=args.calib_samples, seq_len=args.calib_seq_len, lm_head="int8", **common)
        res = _run_worker(job, m)
        quant_info[m] = res
        if "error" not in res:
            (ckpt / "bench_quantize.json").write_text(json.dumps(res))

    rows = [("original", "float32", args.model, False), ("original", dtype, args.model, False)]
    if dtype == "float32":
        rows = rows[:1]
    for m in methods:
        if m == "gguf":
            rows.append(("gguf", dtype, args.model, True))
        elif "error" not in quant_info.get(m, {"error": 1}):
            rows.append((m, dtype, str(out / "checkpoints" / m), False))
    results = []
    for name, dt, model, keep_gguf in rows:
        label = f"{name} ({dt})" if name == "original" else name
        print(f"[measure] {label}: memory, perplexity, sample ...", file=sys.stderr)
        job = dict(kind="measure", model=model, dtype=dt, gguf=keep_gguf, input_len=args.input_len,
                   output_len=args.output_len, eval_tokens=args.eval_tokens,
                   window=args.window, stride=args.window // 2, sample_tokens=48, **common)
        res = _run_worker(job, label)
        res.update(method=name, label=label, run_dtype=dt, quantize=quant_info.get(name, {}), model_path=model,
                   keep_gguf=keep_gguf)
        results.append(res)
    print(f"[speed] all rows in one process, round-robin, best of {args.rounds} ...", file=sys.stderr)
    speed_rows = [dict(label=r["label"], model=r["model_path"], dtype=r["run_dtype"], gguf=r["keep_gguf"])
                  for r in results if "error" not in r]
    speed = _run_worker(dict(kind="speed", rows=speed_rows, input_len=args.input_len, output_len=args.output_len,
                             rounds=args.rounds, **common), "speed")
    for r in results:
        r.update(speed.get(r["label"], {}))

    base = next((r for r in results if r["label"] == f"original ({dtype})" and "ppl" in r), None)
    for r in results:
        if base and "ppl" in r:
            r["dppl_pct"] = (r["ppl"] / base["ppl"] - 1) * 100
        if base and "decode_tok_s" in r:
            r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
    fp32 = next((r for r in results if r["label"] == "original (float32)" and "decode_tok_s" in r), None)
    for r in results:
        if fp32 and "decode_tok_s" in r:
            r["decode_speedup_fp32"] = r["decode_tok_s"] / fp32["decode_tok_s"]

    table = format_table(results, source.name, dtype, group, args)
    print(table)
    meta = dict(model=source.name, dtype=dtype, group_size=group, threads=threads, eval_tokens=args.eval_tokens,
                window=args.window, input_len=args.input_len, output_len=args.output_len,
                calib=f"{args.calib_samples} x {args.calib_seq_len}")
    (out / "quant_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    samples = "\n".join(f"- **{r['label']}**: {json.dumps(r.get('sample', ''))}" for r in results)
    (out / "quant_bench.md").write_text(table + f"\n\nGreedy samples for \"{SAMPLE_PROMPT}\":\n\n" + samples + "\n")
    charts = write_charts(results, out, f"{source.name}: quantization (runtime {dtype})")
    econ = economics_rows(results, args, meta)
    return {"meta": meta, "results": results, "charts": charts, "economics": econ}


def write_charts(results: list[dict], out: Path, title: str) -> list[str]:
    """The bars and the quality-vs-speed scatter (bench/plots.py); the table is the result, so a chart that
    cannot be drawn is only reported."""
    from tokenloom.bench import plots

    written = []
    for name, draw in (("quant_bench.png", plots.quant_bars), ("quant_quality_speed.png", plots.quality_vs_speed)):
        try:
            written.append(str(draw(results, out / name, title)))
        except Exception as exc:  # noqa: BLE001
            print(f"chart {name} not written: {exc}", file=sys.stderr)
    print(f"wrote {out / 'quant_bench.md'}, {', '.join(written)}", file=sys.stderr)
    return written


def economics_rows(results: list[dict], args, meta: dict) -> dict:
    """Per method: bytes per decode token (its weights as measured, the KV at the run's context), the share of
    this machine's read bandwidth its batch-1 decode reaches, and $ per 1M tokens at it."""
    from tokenloom.bench import economics as E
    from tokenloom.bench.hardware import price_from_args
    from tokenloom.bench.roofline import machine_roofs

    roofs, _ = machine_roofs()
    price, source = price_from_args(args)
    rows = {}
    print(f"economics  (roof: read {roofs.bandwidth / 1e9:.1f} GB/s; {source or 'no price: --price-per-hour'})")
    for r in results:
        if "decode_tok_s" not in r or "weight_bytes" not in r:
            continue
        per_token = r.get("decode_bytes_per_step", r["weight_bytes"])  # batch 1: a step is a token
        bw = per_token * r["decode_tok_s"]
        rows[r["label"]] = {"weight_bytes_per_token": per_token, "achieved_bandwidth_gbs": bw / 1e9,
                            "bandwidth_share": bw / roofs.bandwidth,
                            "usd_per_million_tokens": E.cost_per_million(price, r["decode_tok_s"])}
        cost = rows[r["label"]]["usd_per_million_tokens"]
        print(f"  {r['label']:20} {per_token / 1e6:8.1f} MB/token -> {bw / 1e9:6.2f} GB/s = "
              f"{bw / roofs.bandwidth * 100:5.1f} % of bandwidth" + (f", ${cost:.4g} per 1M tokens" if cost else ""))
    return {"roofs": roofs.to_dict(), "price_per_hour": price, "price_source": source, "rows": rows}


def format_table(results: list[dict], model: str, dtype: str, group: int, args) -> str:
    threads = next((r["threads"] for r in results if "threads" in r), "?")
    head = (f"model {model} | runtime dtype {dtype} | 4-bit group size {group} | ppl: {args.eval_tokens} held-out "
            f"tokens, window {args.window} | speed: batch 1, prompt {args.input_len}, {args.output_len} new tokens, "
            f"best of {args.rounds} round-robin rounds, {threads} thread(s)")
    lines = [head, "",
             "| method | weight MB | peak RSS MB | ppl | Δppl % | prefill tok/s | decode tok/s | decode × | kernels |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "ppl" not in r or "decode_tok_s" not in r:
            lines.append(f"| {r['label']} | failed: {r.get('error', 'no result')} | | | | | | | |")
            continue
        kernels = ", ".join(f"{k}×{v}" for k, v in sorted(r.get("kernels", {}).items()))
        lines.append(
            f"| {r['label']} | {r['weight_bytes'] / 1e6:.1f} | {r['peak_rss'] / 1e6:.0f} | {r.get('ppl', float('nan')):.3f} "
            f"| {r.get('dppl_pct', float('nan')):+.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} "
            f"| {r.get('decode_speedup', float('nan')):.2f} | {kernels or 'F.linear'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
