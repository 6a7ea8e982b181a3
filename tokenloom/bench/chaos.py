"""`tokenloom bench serve --chaos`: the reliability load, against a running server.

A mix of what real clients send, at --concurrency in flight: valid requests over the OpenAI and Ollama APIs
(streamed and not, chat and completions, structured output, n > 1 with logprobs, embeddings), clients that
disconnect mid-stream or before the answer (--disconnect share), and malformed bodies (--malformed share: broken
JSON, wrong types, unknown models, out-of-range values, impossible schemas, prompts beyond the context window).

It reports what users care about: valid requests completed; 4xx by status and error code (a malformed body must
get one); 5xx (must be 0); hangs (no answer within --hang-timeout; must be 0); and, once the server is at rest,
the KV blocks still in use (must be 0) and the process's resident memory compared with before the load (from
/metrics: process_resident_memory_bytes, tokenloom_kv_cache_*).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 150}},
           "required": ["name", "age"], "additionalProperties": False}
_WORDS = "the loom weaves threads of every colour into cloth that tells a story of the sea and ships".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _valid(rng: random.Random, model: str, vocab: int) -> tuple[str, dict, bool]:
    """(path, body, streamed) of one well-formed request."""
    msgs = [{"role": "user", "content": _text(rng, rng.randint(3, 40))}]
    n_tok = rng.randint(4, 32)
    kind = rng.randrange(8)
    if kind == 0:
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(4, 300))]
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n_tok, "stream": True,
                                   "ignore_eos": True, "stream_options": {"include_usage": True}}, True
    if kind == 1:
        return "/v1/completions", {"model": model, "prompt": _text(rng, 20), "max_tokens": n_tok,
                                   "temperature": 0.7, "seed": rng.randrange(1 << 20)}, False
    if kind == 2:
        return "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": n_tok, "stream": True}, True
    if kind == 3:
        return "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 48, "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "schema": _SCHEMA}}}, False
    if kind == 4:
        return "/api/generate", {"model": model, "prompt": _text(rng, 12), "options": {"num_predict": n_tok}}, True
    if kind == 5:
        return "/api/chat", {"model": model, "messages": msgs, "stream": False, "options": {"num_predict": n_tok}}, False
    if kind == 6:
        return "/v1/embeddings", {"model": model, "input": [_text(rng, 10), _text(rng, 30)]}, False
    return "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": n_tok, "n": 2,
                                    "logprobs": True, "top_logprobs": 2}, False


def _malformed(rng: random.Random, model: str, max_len: int) -> tuple[str, bytes]:
    """(path, raw body) of a request the server must refuse with a 4xx."""
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/chat/completions", b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", '),
        ("/v1/chat/completions", {"model": model, "messages": "hi"}),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
        ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": -5}),
        ("/v1/chat/completions", {"model": model, "messages": []}),
        ("/v1/completions", {"model": model, "prompt": "x", "n": 100000}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
        ("/v1/completions", {"model": model, "prompt": [5] * (max_len + 10), "max_tokens": 4}),
        ("/api/generate", {"model": model, "prompt": "x", "options": {"temperature": "hot"}}),
        ("/api/chat", {"model": model, "messages": [{"role": "user", "content": {"text": "x"}}]}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "temperature": -1}),
        ("/v1/completions", {"model": model, "prompt": "x", "stream": "yes"}),
        ("/v1/embeddings", {"model": model, "input": [[True, False]]}),
    ]
    path, body = rng.choice(cases)
    return path, body if isinstance(body, bytes) else json.dumps(body).encode()


class Tally:
    def __init__(self):
        self.completed = self.disconnected = self.hangs = self.server_errors = 0
        self.client_errors: Counter = Counter()  # "status code" -> count, for malformed bodies
        self.refused_valid: Counter = Counter()  # a valid request answered 4xx: a bug
        self.accepted_malformed = 0
        self.transport_errors: Counter = Counter()
        self.first_5xx = ""
        self.examples: dict[str, str] = {}  # the first request of each bad outcome, to reproduce it

    def example(self, outcome: str, path: str, body) -> None:
        text = body.decode(errors="replace") if isinstance(body, bytes) else json.dumps(body)
        self.examples.setdefault(outcome, f"POST {path} {text[:300]}")


async def _valid_request(client, base: str, path: str, body: dict, streamed: bool, tally: Tally) -> None:
    if not streamed:
        r = await client.post(base + path, json=body)
        _count(tally, r.status_code, r.content, valid=True)
        return
    async with client.stream("POST", base + path, json=body) as r:
        raw = await r.aread()
    if r.status_code == 200 and (b'data: {"error"' in raw or b'\n{"error"' in b"\n" + raw):
        tally.server_errors += 1  # an error event (SSE or NDJSON) in a stream no one cut
        tally.first_5xx = tally.first_5xx or raw[-300:].decode(errors="replace")
        return
    _count(tally, r.status_code, raw, valid=True)


async def _disconnect(client, base: str, path: str, body: dict, rng: random.Random, tally: Tally) -> None:
    """Start a streamed request, then go away after a few chunks (or before any answer)."""
    body = {**body, "stream": True}
    cut_after = rng.randint(0, 3)
    try:
        async with asyncio.timeout(rng.uniform(0.05, 2.0)):
            async with client.stream("POST", base + path, json=body) as r:
                if r.status_code >= 500:
                    _count(tally, r.status_code, await r.aread(), valid=True)
                    return
                n = 0
                async for _ in r.aiter_raw():
                    n += 1
                    if n > cut_after:
                        break
    except TimeoutError:
        pass
    tally.disconnected += 1


def _count(tally: Tally, status: int, content: bytes, valid: bool) -> None:
    if status >= 500:
        tally.server_errors += 1
        tally.first_5xx = tally.first_5xx or f"HTTP {status}: {content[:300].decode(errors='replace')}"
    elif status >= 400:
        code = ""
        try:
            err = json.loads(content).get("error")
            code = (err.get("code") or err.get("type") or "") if isinstance(err, dict) else ""
        except (ValueError, AttributeError):
            pass
        (tally.refused_valid if valid else tally.client_errors)[f"{status} {code}".strip()] += 1
    elif valid:
        tally.completed += 1
    else:
        tally.accepted_malformed += 1


async def _metrics(client, base: str) -> dict[str, float]:
    text = (await client.get(base + "/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def _at_rest(client, base: str, timeout: float) -> dict[str, float]:
    """/metrics once nothing runs, no KV block is used and the resident KV memory has not changed for 6 s
    (free blocks go back to the OS once unused for a whole release interval, 2 s by default)."""
    deadline, readings = time.monotonic() + timeout, []
    while True:
        m = await _metrics(client, base)
        idle = not (m.get("tokenloom_num_requests_running") or m.get("tokenloom_num_requests_waiting")
                    or m.get("tokenloom_kv_cache_blocks_used"))
        readings = readings + [m.get("tokenloom_kv_cache_resident_bytes")] if idle else []
        if (len(readings) >= 4 and len(set(readings[-4:])) == 1) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(2.0)


async def run_chaos(args, model: str, vocab: int, show: dict) -> dict:
    """show: what /api/show and /api/tags say of the model (bench serve's _discover)."""
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    tally = Tally()
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.hang_timeout, connect=30.0),
                                 limits=limits) as client:
        max_len = int(next((v for k, v in show.get("model_info", {}).items() if k.endswith(".context_length")), 2048))
        for k in range(8):  # warm-up: every kind of valid request once (lazy set-up is not a leak)
            path, body, streamed = _valid(random.Random(k), model, vocab)
            await _valid_request(client, base, path, body, streamed, Tally())
        before = await _at_rest(client, base, args.rest_timeout)
        sem = asyncio.Semaphore(args.concurrency)

        async def one(i: int):
            r = random.Random(args.seed * 1_000_003 + i)
            roll = r.random()
            async with sem:
                try:
                    async with asyncio.timeout(args.hang_timeout):
                        if roll < args.malformed:
                            path, raw = _malformed(r, model, max_len)
                            resp = await client.post(base + path, content=raw,
                                                     headers={"Content-Type": "application/json"})
                            _count(tally, resp.status_code, resp.content, valid=False)
                            if resp.status_code < 400:
                                tally.example("malformed accepted", path, raw)
                        elif roll < args.malformed + args.disconnect:
                            path, body, _ = _valid(r, model, vocab)
                            await _disconnect(client, base, path, body, r, tally)
                        else:
                            path, body, streamed = _valid(r, model, vocab)
                            await _valid_request(client, base, path, body, streamed, tally)
                except TimeoutError:
                    tally.hangs += 1
                    tally.example("hang", path, body if roll >= args.malformed else raw)
                except httpx.HTTPError as exc:
                    tally.transport_errors[type(exc).__name__] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.num_prompts)))
        duration = time.perf_counter() - start
        after = await _at_rest(client, base, args.rest_timeout)
    res = _chaos_report(args, model, tally, duration, before, after)
    res["economics"] = _economics(args, show, duration, before, after)
    return res


def _economics(args, show: dict, duration: float, before: dict, after: dict) -> dict:
    """The load's economics from the server's own counters: generated tokens per second over the load, the
    concurrency as the requests in flight, the context as the mean finished request's prompt + half its output."""
    from tokenloom.bench.token_economics import remote_section

    def grown(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    generated, finished = grown("tokenloom_generation_tokens_total"), grown("tokenloom_request_success_total")
    ctx = int((grown("tokenloom_prompt_tokens_total") + generated / 2) / finished) if finished else 0
    return remote_section(args, show, generated / duration if duration > 0 else 0.0, args.concurrency, ctx)


def _chaos_report(args, model, tally: Tally, duration: float, before: dict, after: dict) -> dict:
    rss0, rss1 = before.get("process_resident_memory_bytes", 0), after.get("process_resident_memory_bytes", 0)
    res = {
        "model": model, "requests": args.num_prompts, "concurrency": args.concurrency, "duration_s": duration,
        "completed": tally.completed, "disconnected": tally.disconnected,
        "client_errors": dict(tally.client_errors), "refused_valid": dict(tally.refused_valid),
        "accepted_malformed": tally.accepted_malformed, "server_errors": tally.server_errors, "hangs": tally.hangs,
        "transport_errors": dict(tally.transport_errors), "examples": tally.examples,
        "kv_blocks_used_at_rest": after.get("tokenloom_kv_cache_blocks_used"),
        "kv_resident_bytes_at_rest": after.get("tokenloom_kv_cache_resident_bytes"),
        "rss_before_bytes": rss0, "rss_after_bytes": rss1, "rss_ratio": rss1 / rss0 if rss0 else None,
    }
    print(f"chaos: {args.num_prompts} requests at concurrency {args.concurrency} against {args.base_url} "
          f"({model}), {args.malformed:.0%} malformed, {args.disconnect:.0%} disconnecting, {duration:.1f} s")
    print(f"  completed (valid)     {tally.completed}")
    print(f"  disconnected          {tally.disconnected}")
    print(f"  4xx (malformed)       {sum(tally.client_errors.values())}  "
          f"{', '.join(f'{k}: {v}' for k, v in sorted(tally.client_errors.items()))}")
    print(f"  malformed accepted    {tally.accepted_malformed}")
    print(f"  valid refused (4xx)   {sum(tally.refused_valid.values())}  {dict(tally.refused_valid) or ''}")
    print(f"  5xx                   {tally.server_errors}  {tally.first_5xx[:200]}")
    print(f"  hangs (> {args.hang_timeout:g} s)       {tally.hangs}")
    print(f"  transport errors      {sum(tally.transport_errors.values())}  {dict(tally.transport_errors) or ''}")
    print(f"  at rest: KV blocks used {res['kv_blocks_used_at_rest']:.0f}, KV resident "
          f"{(res['kv_resident_bytes_at_rest'] or 0) / 2**20:.1f} MiB")
    for outcome, request in tally.examples.items():
        print(f"  first {outcome}: {request}")
    if rss0:
        print(f"  RSS at rest: before {rss0 / 2**20:.0f} MiB, after {rss1 / 2**20:.0f} MiB "
              f"({(rss1 / rss0 - 1) * 100:+.1f} %)")
    return res
