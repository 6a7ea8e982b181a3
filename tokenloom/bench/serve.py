"""`tokenloom bench serve`: load-test a running OpenAI-compatible server over HTTP.

Requests are streamed /v1/completions calls whose prompts are random token ids of the chosen lengths (sent as
token-id list prompts, with ignore_eos so every request generates exactly its output length). They arrive as
a Poisson process at --request-rate (inf = all at once), with at most --concurrency in flight. Per request the
client measures TTFT (request sent -> first streamed token), TPOT ((last - first token) / (tokens - 1)) and
ITL (gaps between streamed chunks); goodput counts requests per second meeting both SLOs. With --chaos it runs
the reliability load of bench/chaos.py instead.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

from tokenloom.bench.common import make_lengths, pct, random_prompts, summary


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float | None = None
    tpot: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def _discover(client, base_url: str, model: str | None) -> tuple[str, int, dict]:
    """The model name (first of /v1/models unless given), its vocabulary size (Ollama /api/show when the
    server has it, else 32000) and what /api/show says of it (architecture numbers, size; {} if nothing)."""
    if model is None:
        r = await client.get(f"{base_url}/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    vocab, show = 32000, {}
    try:
        r = await client.post(f"{base_url}/api/show", json={"model": model})
        if r.status_code == 200:
            show = r.json()
            info = show.get("model_info", {})
            vocab = int(next(v for k, v in info.items() if k.endswith(".vocab_size")))
            tags = (await client.get(f"{base_url}/api/tags")).json().get("models", [])
            show["size"] = next((t.get("size") for t in tags if model in (t.get("name"), t.get("model"))), None)
    except Exception:  # noqa: BLE001 - not a tokenloom server: keep the default
        pass
    return model, vocab, show


def concurrencies(text: str) -> list[int]:
    """--concurrency: one value or a comma list (one run each); 0 = unbounded."""
    from tokenloom.config import TokenloomError

    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise TokenloomError(f"--concurrency takes integers >= 0, one or a comma list (e.g. 1,4,16), not {text!r}")
    return values


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    res = await stream_request(client, url, body)
    res.prompt_len = len(prompt)
    return res


async def stream_request(client, url: str, body: dict, on_chunk=None) -> RequestResult:
    """One streamed OpenAI request (completions or chat), timed: TTFT, TPOT, ITL, latency; on_chunk(obj) sees
    each chunk that has choices."""
    res = RequestResult()
    start = time.perf_counter()
    first = last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])
                    return res
                if obj.get("usage"):
                    usage_tokens = obj["usage"]["completion_tokens"]
                if not obj.get("choices"):
                    continue
                if on_chunk is not None:
                    on_chunk(obj)
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    end = time.perf_counter()
    res.latency = end - start
    res.output_len = usage_tokens if usage_tokens is not None else chunks
    if first is not None:
        res.ttft = first - start
        if res.output_len > 1:
            res.tpot = (last - first) / (res.output_len - 1)
    res.ok = first is not None
    return res


async def _run(args) -> dict:
    import httpx

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n = args.num_prompts
    levels = concurrencies(args.concurrency)
    limit = max(c if c > 0 else n for c in levels)
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        model, vocab, show = await _discover(client, base_url, args.model)
    if getattr(args, "chaos", False):
        from tokenloom.bench.chaos import run_chaos

        args.concurrency = levels[0] or n
        return await run_chaos(args, model, vocab, show)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        lengths = make_lengths(n, args.input_len, args.output_len, args.dist, args.seed)
        prompts = random_prompts(lengths, vocab, args.seed)
        url = f"{base_url}/v1/completions"
        await _one(client, url, model, prompts[0][:8], 2)  # warm-up (connection, first-request costs)
        runs = []
        for level in levels:
            results, duration = await _load(client, url, model, prompts, lengths, level or n, args)
            runs.append(_report(args, model, results, duration, level))
    return _finish(args, model, show, runs)


async def _load(client, url, model, prompts, lengths, limit: int, args) -> tuple[list[RequestResult], float]:
    """One load: the prompts arriving at --request-rate (Poisson), at most `limit` in flight."""
    n = len(prompts)
    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(limit)

    async def limited(p, lo):
        async with sem:
            return await _one(client, url, model, p, lo)

    start = time.perf_counter()
    tasks = []
    for i, (p, (_, lo)) in enumerate(zip(prompts, lengths)):
        tasks.append(asyncio.create_task(limited(p, lo)))
        if math.isfinite(args.request_rate) and args.request_rate > 0 and i < n - 1:
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def _finish(args, model: str, show: dict, runs: list[dict]) -> dict:
    """One run: its report; several: each level's report and the table over them. Then the economics of the
    busiest level, and the charts (--plot DIR)."""
    from tokenloom.bench.token_economics import remote_section

    if len(runs) > 1:
        print(f"{'concurrency':>12}{'req/s':>9}{'out tok/s':>11}{'goodput':>9}{'TTFT p50':>10}{'TPOT p50':>10}")
        for r in runs:
            print(f"{r['concurrency'] or 'inf':>12}{r['req_s']:9.2f}{r['out_tok_s']:11.1f}{r['goodput_req_s']:9.2f}"
                  f"{r['ttft_ms'].get('p50', float('nan')):10.1f}{r['tpot_ms'].get('p50', float('nan')):10.1f}")
    top = max(runs, key=lambda r: r["out_tok_s"])
    in_flight = top["req_s"] * top["e2e_ms"].get("mean", 0.0) / 1000  # Little's law: requests in the server
    econ = remote_section(args, show, top["out_tok_s"], in_flight, args.input_len + args.output_len // 2)
    charts = _charts(args, model, runs) if getattr(args, "plot", None) else []
    for r in runs:
        r.pop("_raw")
    res = dict(runs[0]) if len(runs) == 1 else {"model": model, "runs": runs,
                                                 "concurrency": [r["concurrency"] for r in runs]}
    res.update(economics=econ, charts=charts)
    return res


def _charts(args, model: str, runs: list[dict]) -> list[str]:
    from pathlib import Path

    from tokenloom.bench import plots

    out = Path(args.plot)
    written = []
    if len(runs) > 1:
        plotted = [{**r, "concurrency": r["concurrency"] or args.num_prompts} for r in runs]
        written.append(plots.throughput_vs_concurrency(plotted, out / "serve_throughput.png",
                                                       f"{model}: throughput vs concurrency"))
    for r in runs:
        tag = f"_c{r['concurrency']}" if len(runs) > 1 else ""
        written.append(plots.latency_distributions(r["_raw"]["ttft"], r["_raw"]["tpot"],
                                                   out / f"serve_latency{tag}.png",
                                                   f"{model}: concurrency {r['concurrency'] or 'unbounded'}"))
    for path in written:
        print(f"wrote {path}")
    return [str(p) for p in written]


def _report(args, model: str, results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_len for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    itl = [x for r in ok for x in r.itl]
    lat = [r.latency for r in ok]
    slo_ttft, slo_tpot = args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000
    good = [r for r in ok if r.ttft is not None and r.ttft <= slo_ttft and (r.tpot is None or r.tpot <= slo_tpot)]
    rate = "inf" if not math.isfinite(args.request_rate) else f"{args.request_rate:g}"
    res = {
        "model": model, "concurrency": concurrency, "completed": len(ok), "failed": len(failed), "duration_s": duration,
        "req_s": len(ok) / duration, "out_tok_s": n_out / duration, "total_tok_s": (n_in + n_out) / duration,
        "input_tokens": n_in, "output_tokens": n_out, "goodput_req_s": len(good) / duration,
        "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot), "itl_ms": _stats(itl), "e2e_ms": _stats(lat),
        "_raw": {"ttft": ttft, "tpot": tpot},  # for the charts; not in the JSON
    }
    print(f"server {args.base_url}  model {model}  {len(results)} requests  rate {rate} req/s  concurrency "
          f"{concurrency or 'unbounded'}  dist {args.dist}  input {args.input_len}  output {args.output_len}")
    print(f"completed {len(ok)}  failed {len(failed)}  duration {duration:.2f} s  "
          f"input {n_in} tokens  output {n_out} tokens")
    print(f"request throughput {res['req_s']:8.2f} req/s")
    print(f"output throughput  {res['out_tok_s']:8.1f} tok/s   total {res['total_tok_s']:8.1f} tok/s")
    print(f"  TTFT ms   {summary(ttft)}")
    print(f"  TPOT ms   {summary(tpot)}")
    print(f"  ITL ms    {summary(itl)}")
    print(f"  E2E ms    {summary(lat)}")
    print(f"goodput {res['goodput_req_s']:.2f} req/s  ({len(good)}/{len(results)} requests meet TTFT <= "
          f"{args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms)")
    if failed:
        print(f"first failure: {failed[0].error}")
    return res


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    v = [x * 1000 for x in values]
    return {"mean": statistics.mean(v), "p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99)}


def bench_serve(args) -> dict:
    return asyncio.run(_run(args))
