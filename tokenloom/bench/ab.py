"""`tokenloom bench ab`: send a chat load to an A/B route and compare its variants.

Either against a running server (`--base-url URL --route NAME`), or on its own: `--variants A,B[,...]` starts a
`tokenloom serve` in this process with the route `ab` split evenly (or by `--weights`) over them, each variant
loaded by its first request. Requests are streamed chat completions of varied prompts with logprobs; each
response's `model` says which variant served it. Per variant: requests, errors, TTFT and TPOT, output tok/s over
the run, and the quality signal (mean token logprob of the generated text); plus the time to first token of each
variant's first request (it triggered the load) beside the loaded model's median.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict

from tokenloom.bench.common import pct, summary
from tokenloom.bench.serve import RequestResult, stream_request
from tokenloom.bench.token_economics import remote_section

PROMPTS = [
    "Write one sentence about the sea.", "Name three colours.", "What is a loom used for?",
    "Give me a short greeting.", "Describe a cat in a few words.", "What is two plus two?",
    "Suggest a name for a boat.", "Say something about the weather.", "List two fruits.",
    "Write a line of a poem about weaving.", "What is the capital of France?", "Tell me a fun fact.",
]


async def _load(args, base_url: str, route: str) -> tuple[dict[str, list], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    by_variant: dict[str, list[tuple[RequestResult, float | None, float]]] = defaultdict(list)
    sem = asyncio.Semaphore(max(1, args.concurrency))
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        async def one(i: int) -> None:
            body = {"model": route, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": args.output_len, "temperature": args.temperature, "logprobs": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            if args.sticky_users:
                body["user"] = f"user-{i % args.sticky_users}"
            seen = {"model": "?", "logprobs": []}

            def on_chunk(obj):
                seen["model"] = obj.get("model", seen["model"])
                for c in obj["choices"]:
                    seen["logprobs"] += [t["logprob"] for t in ((c.get("logprobs") or {}).get("content") or [])]

            async with sem:
                t0 = time.perf_counter()
                res = await stream_request(client, f"{base_url}/v1/chat/completions", body, on_chunk)
            lps = seen["logprobs"]
            by_variant[seen["model"] if res.ok else "(failed)"].append(
                (res, statistics.mean(lps) if lps else None, t0))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.num_prompts)))
    return by_variant, time.perf_counter() - start


def _table(by_variant: dict[str, list], duration: float) -> dict:
    total = sum(len(v) for v in by_variant.values())
    out = {}
    print("TTFT p50: requests sent once the variant was loaded; TTFT 1st: its first request, which loaded it")
    print(f"{'variant':<28} {'reqs':>5} {'share':>6} {'errors':>6} {'TTFT p50':>9} {'TTFT 1st':>9} {'TPOT p50':>9} "
          f"{'out tok/s':>9} {'mean logprob':>12}")
    for name, rows in sorted(by_variant.items()):
        ok = [(r, lp, t0) for r, lp, t0 in rows if r.ok]
        ok.sort(key=lambda row: row[2])
        ttft = [r.ttft for r, _, _ in ok if r.ttft is not None]
        first = ttft[0] if ttft else float("nan")  # the variant's first request: it loaded the model
        ready = ok[0][2] + ok[0][0].ttft if ok and ok[0][0].ttft is not None else 0.0
        warm = [r.ttft for r, _, t0 in ok[1:] if r.ttft is not None and t0 >= ready]  # sent once it was loaded
        tpot = [r.tpot for r, _, _ in ok if r.tpot is not None]
        lps = [lp for _, lp, _ in ok if lp is not None]
        tokens = sum(r.output_len for r, _, _ in ok)
        out[name] = {"requests": len(rows), "share": len(rows) / max(total, 1), "errors": len(rows) - len(ok),
                     "ttft_p50_ms": pct(warm, 50) * 1000 if warm else None, "ttft_first_ms": first * 1000,
                     "tpot_p50_ms": pct(tpot, 50) * 1000 if tpot else None, "out_tok_s": tokens / duration,
                     "mean_logprob": statistics.mean(lps) if lps else None}
        o = out[name]
        print(f"{name:<28} {o['requests']:>5} {o['share']:>6.1%} {o['errors']:>6} "
              f"{_ms(o['ttft_p50_ms']):>9} {_ms(o['ttft_first_ms']):>9} {_ms(o['tpot_p50_ms']):>9} "
              f"{o['out_tok_s']:>9.1f} {o['mean_logprob'] if o['mean_logprob'] is not None else float('nan'):>12.3f}")
        if warm:
            print(f"  TTFT ms of the {len(warm)} requests sent once it was loaded: {summary(warm)}")
    return out


def _ms(v) -> str:
    return "-" if v is None or v != v else f"{v:.0f} ms"


def _own_server(args):
    """A `tokenloom serve` (many models) in this process with route `ab` over --variants."""
    import dataclasses
    import threading

    import uvicorn

    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.engine_args import EngineArgs
    from tokenloom.entrypoints.model_pool import ModelPool, ModelSources, PoolConfig
    from tokenloom.entrypoints.routing import Router
    from tokenloom.entrypoints.server import build_app
    from tokenloom.loader.variants import split_tag

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(variants)
    base = EngineArgs.from_namespace(args)

    def load(variant, source):
        return AsyncEngine(dataclasses.replace(base, model=source, **variant.overrides).create_llm().engine).start()

    sources = ModelSources(sorted({split_tag(v)[0] for v in variants}))
    pool = ModelPool(PoolConfig(max_loaded_models=len(variants)), factory=load, sources=sources)
    app = build_app(None, pool=pool, router=Router(routes={"ab": dict(zip(variants, weights, strict=True))}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def bench_ab(args) -> dict:
    server = thread = None
    if args.variants:
        server, thread, base_url = _own_server(args)
        route = "ab"
    else:
        base_url, route = args.base_url.rstrip("/"), args.route
    try:
        by_variant, duration = asyncio.run(_load(args, base_url, route))
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(30)
    print(f"route '{route}' at {base_url}: {args.num_prompts} chat requests, concurrency {args.concurrency}, "
          f"{args.output_len} new tokens, {duration:.1f} s")
    variants = _table(by_variant, duration)
    econ = remote_section(args, {}, sum(v["out_tok_s"] for v in variants.values()), 0.0, 0)
    return {"route": route, "duration_s": duration, "variants": variants, "economics": econ}
