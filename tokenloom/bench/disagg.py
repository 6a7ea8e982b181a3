"""`tokenloom bench disagg`: prefill/decode disaggregation against one colocated engine, under the load it is
for: short chats decoding while long prompts arrive.

Both setups run in worker processes started by this command and get the same load in the same run (rounds
alternate which goes first): colocated is one engine using every core; disaggregated is --prefill-workers 1
--decode-workers 1, each worker with half the cores (one torch thread each on a 2-core machine). A colocated
engine prefills a long prompt in the same steps as the chats' decodes, so every chat waits for it: a spike in
inter-token latency (ITL). Disaggregated, the decode worker never runs a prompt: the chats keep their pace and
the long prompts' first tokens come from the prefill worker. Reported: the chats' ITL p50/p90/p99 (ms, as the
client sees tokens arrive), their TTFT, the long prompts' TTFT, and the KV blocks moved.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tokenloom.bench.common import pct, random_prompts
from tokenloom.bench.token_economics import model_section
from tokenloom.sampling_params import SamplingParams


async def _consume(stream, t_submit: float, record: dict) -> None:
    times, seen = [], 0
    async for out in stream:
        now = time.perf_counter()
        n = len(out.outputs[0].token_ids)
        if n > seen:
            times.extend([now] * (n - seen))
            seen = n
    record["ttft"] = times[0] - t_submit if times else None
    # tokens that arrived together share their wait: each gets the gap before the batch over its size
    record["itl"] = _spread(times)
    record["tokens"] = seen


def _spread(times: list[float]) -> list[float]:
    out, i = [], 1
    while i < len(times):
        j = i
        while j + 1 < len(times) and times[j + 1] == times[i]:
            j += 1
        share = (times[i] - times[i - 1]) / (j - i + 1)
        out += [share] * (j - i + 1)
        i = j + 1
    return out


async def _load(engine, chats, longs, chat_out: int, long_out: int, long_every_s: float) -> dict:
    chat_params = SamplingParams(max_tokens=chat_out, temperature=0, ignore_eos=True)
    long_params = SamplingParams(max_tokens=long_out, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    chat_recs, long_recs, tasks = [], [], []
    for p in chats:
        rec: dict = {}
        chat_recs.append(rec)
        tasks.append(asyncio.create_task(_consume(await engine.add_request(p, chat_params), time.perf_counter(),
                                                  rec)))
    for k, p in enumerate(longs):
        await asyncio.sleep(max(0.0, start + long_every_s * (k + 1) - time.perf_counter()))
        rec = {}
        long_recs.append(rec)
        tasks.append(asyncio.create_task(_consume(await engine.add_request(p, long_params), time.perf_counter(),
                                                  rec)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    itl = [g for r in chat_recs for g in r["itl"]]
    tokens = sum(r["tokens"] for r in chat_recs + long_recs)
    return dict(itl=itl, chat_ttft=[r["ttft"] for r in chat_recs], long_ttft=[r["ttft"] for r in long_recs],
                wall_s=wall, tokens=tokens)


def _summary(runs: list[dict]) -> dict:
    itl = [g for r in runs for g in r["itl"]]
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    return dict(itl_p50_ms=ms(pct(itl, 50)), itl_p90_ms=ms(pct(itl, 90)), itl_p99_ms=ms(pct(itl, 99)),
                itl_max_ms=ms(max(itl)), chat_ttft_p50_ms=ms(pct([t for r in runs for t in r["chat_ttft"]], 50)),
                long_ttft_p50_ms=ms(pct([t for r in runs for t in r["long_ttft"]], 50)),
                long_ttft_max_ms=ms(max(t for r in runs for t in r["long_ttft"])),
                tokens_per_s=round(sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs), 1))


def bench_disagg(args) -> dict:
    from tokenloom.engine.disagg import DisaggEngine
    from tokenloom.engine.process_client import ProcessEngine
    from tokenloom.entrypoints.engine_args import EngineArgs
    from tokenloom.entrypoints.scale_out import engine_config

    config = engine_config(EngineArgs.from_namespace(args))
    cores = os.cpu_count() or 1
    each = max(1, cores // 2)
    cores = args.colocated_threads or cores
    print(f"starting: colocated (1 engine, {cores} threads) and disaggregated (1 prefill + 1 decode worker, "
          f"{each} thread(s) each)", flush=True)
    colocated = ProcessEngine(config, threads=cores, name="colocated", wait=False)
    disagg = DisaggEngine(config, 1, 1, threads=each)
    colocated.wait_ready()
    setups = {"colocated": colocated, "disaggregated": disagg}
    vocab = colocated.model_config.vocab_size
    runs: dict[str, list] = {name: [] for name in setups}
    try:
        for name, engine in setups.items():  # warm-up at the load's shapes: kernels, first steps, page faults
            asyncio.run(_load(engine, random_prompts([(args.chat_len, 0)] * args.num_chats, vocab, seed=99),
                              random_prompts([(args.long_len, 0)], vocab, seed=98), 4, 2, 0.05))
        for r in range(args.rounds):
            chats = random_prompts([(args.chat_len, 0)] * args.num_chats, vocab, seed=2 * r)
            longs = random_prompts([(args.long_len, 0)] * args.num_long, vocab, seed=2 * r + 1)
            order = list(setups) if r % 2 == 0 else list(setups)[::-1]
            for name in order:
                res = asyncio.run(_load(setups[name], chats, longs, args.output_len, args.long_output_len,
                                        args.long_every))
                runs[name].append(res)
                print(f"round {r + 1} {name:14s} ITL p99 {pct(res['itl'], 99) * 1000:8.1f} ms  "
                      f"wall {res['wall_s']:.1f} s", flush=True)
        source, model_config = colocated.engine.model_source, colocated.model_config
        transfer = disagg.kv_transfer_stats()
        decode_prompt_tokens = disagg.decode[0].stats().prompt_tokens_computed
    finally:
        colocated.shutdown()
        disagg.shutdown()
    result = {name: _summary(rs) for name, rs in runs.items()}
    result["load"] = dict(model=config.model, num_chats=args.num_chats, chat_len=args.chat_len,
                          output_len=args.output_len, num_long=args.num_long, long_len=args.long_len,
                          long_output_len=args.long_output_len, long_every_s=args.long_every, rounds=args.rounds,
                          colocated_threads=cores, disagg_threads_per_worker=each)
    result["kv_transfer"] = dict(blocks=transfer.blocks, bytes=transfer.bytes, transfers=transfer.transfers,
                                 fallbacks=transfer.fallbacks, blocks_skipped=transfer.blocks_skipped,
                                 mean_seconds=transfer.seconds_sum / max(1, transfer.transfers))
    result["decode_worker_prompt_tokens_computed"] = decode_prompt_tokens
    c, d = result["colocated"], result["disaggregated"]
    result["itl_p99_ratio"] = round(d["itl_p99_ms"] / c["itl_p99_ms"], 3) if c["itl_p99_ms"] else None
    _print(result)
    ctx = args.chat_len + args.output_len // 2
    result["economics"] = {}
    for name in setups:  # the chats decoding side by side are the batch a step's weights are read for
        print(f"{name}:")
        result["economics"][name] = model_section(args, model_config, _stored_bytes(source.path),
                                                  result[name]["tokens_per_s"], args.num_chats, ctx)
    return result


def _stored_bytes(path) -> float:
    """The model's weights as stored: the GGUF file, or a folder's safetensors files (as `tokenloom show`)."""
    from tokenloom.loader.safetensors import safetensors_files

    path = Path(path)
    if path.is_file():
        return float(path.stat().st_size)
    return float(sum(f.stat().st_size for f in safetensors_files(path)))


def _print(result: dict) -> None:
    rows = [("ITL p50 (ms)", "itl_p50_ms"), ("ITL p90 (ms)", "itl_p90_ms"), ("ITL p99 (ms)", "itl_p99_ms"),
            ("ITL max (ms)", "itl_max_ms"), ("chat TTFT p50 (ms)", "chat_ttft_p50_ms"),
            ("long TTFT p50 (ms)", "long_ttft_p50_ms"), ("long TTFT max (ms)", "long_ttft_max_ms"),
            ("tokens/s (all)", "tokens_per_s")]
    load = result["load"]
    print(f"\n{load['num_chats']} chats ({load['chat_len']} -> {load['output_len']} tokens) decoding while "
          f"{load['num_long']} prompts of {load['long_len']} tokens arrive every {load['long_every_s']} s; "
          f"{load['rounds']} round(s)")
    print(f"{'':22s}{'colocated':>12s}{'disaggregated':>15s}")
    for label, key in rows:
        print(f"{label:22s}{result['colocated'][key]:12.1f}{result['disaggregated'][key]:15.1f}")
    t = result["kv_transfer"]
    print(f"KV moved: {t['blocks']} blocks, {t['bytes'] / 2**20:.1f} MiB in {t['transfers']} transfers "
          f"(mean {t['mean_seconds'] * 1000:.1f} ms), {t['fallbacks']} fallbacks; decode worker prompt tokens "
          f"computed: {result['decode_worker_prompt_tokens_computed']}")
    print(f"disaggregated / colocated ITL p99: {result['itl_p99_ratio']}")
