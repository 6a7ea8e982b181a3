"""Prefill/decode disaggregation: a request prefilled by one engine and decoded by another gives the tokens one
engine gives (colocated), the decode side computes no prompt token, no KV block leaks on either side.

The fast tests run both sides in this process (two LLMEngines and their KV connectors, the hand-off through a
real shared-memory segment); the process tests run the DisaggEngine front with worker processes, as
`tokenloom serve MODEL --prefill-workers 1 --decode-workers 1` does.
"""
from __future__ import annotations

import asyncio
import glob
import os
import random

import pytest

from tokenloom import LLM, SamplingParams
from tokenloom.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenloom.engine.kv_connector import KVConnector, prompt_block_hashes
from tokenloom.worker.kv_transfer import SHM_DIR

BS = 16


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _prompts(k: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 15, 16, 17, 32, 47, 90][:k]  # under a block, block edges, several blocks
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lengths]


def _segments() -> set[str]:
    return set(glob.glob(os.path.join(SHM_DIR, f"tokenloom-kv-*-{os.getpid()}-*")))


@pytest.fixture(scope="module")
def pair(tiny_llama):
    """(colocated LLM, prefill engine + connector, decode engine + connector), float32 on the tiny llama."""
    path = str(tiny_llama[0])
    make = lambda **kw: LLM(path, dtype="float32", num_blocks=64, max_num_batched_tokens=64, **kw)  # noqa: E731
    prefill, decode = make().engine, make().engine
    return make(), (prefill, KVConnector(prefill)), (decode, KVConnector(decode))


def _run(engine) -> list:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def _disagg(pair, prompt, params, rid, skip=0, tamper=None):
    """Prefill on one engine, hand over, decode on the other; the final output of each side."""
    _, (pe, pc), (de, dc) = pair
    pe.add_request(prompt, params, rid)
    pc.mark_export(rid, skip)
    first = [o for o in _run(pe) if o.request_id == rid][-1]
    handoff = pc.take_handoff(rid)
    if tamper is not None:
        tamper(handoff)
    o = first.outputs[0]
    dc.add_prefilled(rid, prompt, params, o.token_ids[0], o.logprobs[0] if o.logprobs else None, handoff)
    return first, [o for o in _run(de) if o.request_id == rid][-1]


def _assert_no_leak(*engines):
    for eng in engines:
        kv = eng.kv_cache_manager
        assert kv.num_free_blocks == kv.num_blocks
        kv.check_invariants([])
    assert not _segments()


def test_disaggregated_equals_colocated_greedy(pair):
    colocated, (pe, pc), (de, dc) = pair
    prompts = _prompts(7)
    ref = [o.outputs[0].token_ids for o in colocated.generate(prompts, _greedy(12))]
    de.reset_prefix_cache()
    before = de.stats().prompt_tokens_computed
    for i, prompt in enumerate(prompts):
        first, out = _disagg(pair, prompt, _greedy(12), f"g{i}")
        assert first.outputs[0].token_ids == ref[i][:1]
        assert out.outputs[0].token_ids == ref[i]
        assert out.outputs[0].finish_reason == "length"
    assert de.stats().prompt_tokens_computed == before  # the decode side computed no prompt token
    assert dc.counters["fallbacks"] == 0 and dc.counters["transfers"] >= 6  # the 1-token prompt: nothing to send
    _assert_no_leak(pe, de)


def test_seeded_sampling_continues_the_same_stream(pair):
    colocated = pair[0]
    prompt = _prompts(6)[5]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    ref = colocated.generate(prompt, params)[0].outputs[0].token_ids
    _, out = _disagg(pair, prompt, params, "seeded")
    assert out.outputs[0].token_ids == ref
    assert len(set(ref)) > 3  # really sampled


def test_held_blocks_are_not_sent_again(pair):
    colocated, (pe, pc), (de, dc) = pair
    rng = random.Random(5)
    shared = [rng.randrange(3, 320) for _ in range(3 * BS)]
    a, b = shared + [7, 8, 9], shared + [rng.randrange(3, 320) for _ in range(20)]
    ref = [o.outputs[0].token_ids for o in colocated.generate([a, b], _greedy(8))]
    de.reset_prefix_cache()
    pe.reset_prefix_cache()
    received = dc.counters["blocks_received"]
    _, out_a = _disagg(pair, a, _greedy(8), "pa")
    sent_a = dc.counters["blocks_received"] - received
    # the orchestrator's question: which of b's blocks does the decode side hold? (its prefix cache, by hash)
    held = 0
    for h in prompt_block_hashes(b, BS):
        if de.kv_cache_manager.pool.lookup(h) is None:
            break
        held += 1
    assert held == 3
    _, out_b = _disagg(pair, b, _greedy(8), "pb", skip=held)
    sent_b = dc.counters["blocks_received"] - received - sent_a
    assert sent_a == 4  # 51 tokens: 3 full blocks and a partial one
    assert sent_b == 5 - held  # 68 tokens: 5 blocks, the 3 shared ones not sent
    assert [out_a.outputs[0].token_ids, out_b.outputs[0].token_ids] == ref
    # sent in full (no hint), the decode side still copies in only what its prefix cache lacks: a's last block
    received = dc.counters["blocks_received"]
    _, again = _disagg(pair, a, _greedy(8), "pa2")
    assert dc.counters["blocks_received"] - received == 1
    assert again.outputs[0].token_ids == ref[0]
    _assert_no_leak(pe, de)


def test_failed_transfer_recomputes_with_the_same_output(pair):
    colocated, (pe, pc), (de, dc) = pair
    prompt = _prompts(7)[6]
    ref = colocated.generate(prompt, _greedy(10))[0].outputs[0].token_ids
    de.reset_prefix_cache()
    fallbacks, computed = dc.counters["fallbacks"], de.stats().prompt_tokens_computed
    _, out = _disagg(pair, prompt, _greedy(10), "lost", tamper=lambda h: h.segment.unlink())  # segment lost
    assert out.outputs[0].token_ids == ref
    assert dc.counters["fallbacks"] == fallbacks + 1
    assert de.stats().prompt_tokens_computed == computed + len(prompt)
    # a stale hint: the sender skipped blocks the decode side no longer holds
    de.reset_prefix_cache()
    _, out = _disagg(pair, prompt, _greedy(10), "stale", skip=2)
    assert out.outputs[0].token_ids == ref
    assert dc.counters["fallbacks"] == fallbacks + 2
    _assert_no_leak(pe, de)


def test_abort_mid_transfer_frees_both_sides(pair):
    _, (pe, pc), (de, dc) = pair
    prompt = _prompts(7, seed=11)[6]  # not in either prefix cache
    # aborted on the prefill side between chunks (64-token budget: the 90-token prompt takes two steps)
    pe.add_request(prompt, _greedy(5), "ab1")
    pc.mark_export("ab1")
    pe.step()
    assert pe.kv_cache_manager.num_used_blocks > 0
    pe.abort_request("ab1")
    assert pc.take_handoff("ab1") is None
    # aborted after the export, while queued on the decode side (its segment waiting to be loaded)
    pe.add_request(prompt, _greedy(5), "ab2")
    pc.mark_export("ab2")
    first = _run(pe)[-1].outputs[0]
    handoff = pc.take_handoff("ab2")
    assert os.path.exists(handoff.segment.path)
    dc.add_prefilled("ab2", prompt, _greedy(5), first.token_ids[0], None, handoff)
    de.abort_request("ab2")
    assert not os.path.exists(handoff.segment.path)
    # aborted after the load, mid-decode
    pe.add_request(prompt, _greedy(50), "ab3")
    pc.mark_export("ab3")
    first = _run(pe)[-1].outputs[0]
    dc.add_prefilled("ab3", prompt, _greedy(50), first.token_ids[0], None, pc.take_handoff("ab3"))
    de.step()
    de.step()
    de.abort_request("ab3")
    _assert_no_leak(pe, de)


# ---- worker processes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disagg(tiny_llama):
    from tokenloom.engine.disagg import DisaggEngine

    cfg = EngineConfig(model=str(tiny_llama[0]), dtype="float32", cache=CacheConfig(num_blocks=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64))
    engine = DisaggEngine(cfg, prefill_workers=1, decode_workers=1, threads=1)
    yield engine
    engine.shutdown()


async def _settle(engine, timeout=10.0):
    """Until the workers' statistics show no request and no block in use."""
    for _ in range(int(timeout / 0.05)):
        if all(w.stats().num_blocks_used == 0 and not w.has_unfinished() for w in engine.workers):
            return
        await asyncio.sleep(0.05)
    raise AssertionError([w.stats() for w in engine.workers])


def test_disagg_engine_processes(pair, disagg):
    colocated = pair[0]
    prompts = _prompts(7)
    rng = random.Random(9)
    shared = [rng.randrange(3, 320) for _ in range(2 * BS)]
    again = [shared + [3, 4], shared + [5, 6, 7]]
    ref = [o.outputs[0].token_ids for o in colocated.generate(prompts + again, _greedy(12))]

    async def main():
        streams = [await disagg.add_request(p, _greedy(12)) for p in prompts]  # concurrently
        outs = await asyncio.gather(*(s.collect() for s in streams))
        assert [o.outputs[0].token_ids for o in outs] == ref[:7]
        t = disagg.transfer
        before = (t.blocks, t.blocks_skipped)
        first = await (await disagg.add_request(again[0], _greedy(12))).collect()
        second = await (await disagg.add_request(again[1], _greedy(12))).collect()
        assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == ref[7:]
        assert t.blocks_skipped - before[1] == 2  # the second prompt's two shared blocks were not sent
        assert t.blocks - before[0] == 3 + 1  # the first prompt's three blocks, the second's last one
        assert t.fallbacks == 0 and t.transfers == 9 and t.bucket_counts[-1] == 0
        await _settle(disagg)
        decode, prefill = disagg.decode[0].stats(), disagg.prefill[0].stats()
        assert decode.prompt_tokens_computed == 0
        assert prefill.prompt_tokens_computed > 0
        # a lost segment: the decode worker recomputes, same tokens
        disagg.drop_segments = True
        try:
            lost = await (await disagg.add_request(prompts[6], _greedy(12))).collect()
        finally:
            disagg.drop_segments = False
        assert lost.outputs[0].token_ids == ref[6]
        await _settle(disagg)
        assert t.fallbacks == 1
        # aborts at every stage: right away (in prefill), after the first token (mid-transfer or decoding)
        for wait_for in (0, 1, 3):
            stream = await disagg.add_request(prompts[6], _greedy(200))
            while wait_for and len((await stream.__anext__()).outputs[0].token_ids) < wait_for:
                pass
            stream.close()
        await _settle(disagg)
        assert not disagg._requests

    asyncio.run(main())
    assert not _segments()


def test_disagg_metrics_render(disagg):
    from tokenloom.entrypoints.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.attach("tiny", disagg)
    text = metrics.render().decode()
    assert 'tokenloom_kv_transfer_blocks_total{model_name="tiny"}' in text
    assert "tokenloom_kv_transfer_bytes_total" in text
    assert 'tokenloom_kv_transfer_seconds_bucket{le="+Inf",model_name="tiny"}' in text
    blocks = next(line for line in text.splitlines() if line.startswith("tokenloom_kv_transfer_blocks_total"))
    assert float(blocks.split()[-1]) == disagg.transfer.blocks > 0


def test_dead_prefill_worker_falls_back_to_the_decode_worker(pair, disagg):
    """Runs last on the module's workers: a killed prefill worker fails no request, the decode worker computes
    the prompts itself (same tokens); a killed decode worker fails its requests with an error, not a hang."""
    from tokenloom.engine.async_engine import EngineDeadError

    prompt = _prompts(7, seed=21)[5]
    ref = pair[0].generate(prompt, _greedy(12))[0].outputs[0].token_ids

    async def main():
        disagg.prefill[0].process.kill()
        out = await asyncio.wait_for((await disagg.add_request(prompt, _greedy(12))).collect(), 60)
        assert out.outputs[0].token_ids == ref
        stream = await disagg.add_request(prompt, _greedy(500))
        await stream.__anext__()
        disagg.decode[0].process.kill()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream.collect(), 30)
        with pytest.raises(EngineDeadError):
            await disagg.add_request(prompt, _greedy(4))

    asyncio.run(main())


@pytest.mark.slow
def test_disaggregated_equals_colocated_default_model(default_llm):
    from tokenloom.engine.disagg import DisaggEngine

    tok = default_llm.tokenizer
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True),
                          add_special_tokens=False) for c in chats]
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]
    cfg = EngineConfig(model="smollm2-135m", dtype="float32", scheduler=SchedulerConfig(max_model_len=2048),
                       cache=CacheConfig(kv_cache_memory=256 << 20))
    engine = DisaggEngine(cfg, 1, 1, threads=1)
    try:
        async def main():
            streams = [await engine.add_request(p, params) for p in prompts]
            return [(await s.collect()).outputs[0].token_ids for s in streams]

        assert asyncio.run(main()) == ref
        assert engine.decode[0].stats().prompt_tokens_computed == 0
        _served_chat_matches(default_llm, engine)
    finally:
        engine.shutdown()


def _served_chat_matches(llm, engine):
    """Behind the real server (uvicorn, the openai client), a streamed chat answers what the colocated engine
    answers, and /metrics counts the KV blocks moved."""
    import threading
    import time

    import httpx
    import openai
    import uvicorn

    from tokenloom.entrypoints.server import build_app

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = llm.generate(llm.chat_prompt_ids(messages), SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, None, max_queue=64), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chunks = client.chat.completions.create(model=engine.model_name, messages=messages, temperature=0,
                                                max_tokens=12, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        metrics = httpx.get(url + "/metrics", timeout=30).text
        blocks = [line for line in metrics.splitlines() if line.startswith("tokenloom_kv_transfer_blocks_total")]
        assert blocks and float(blocks[0].split()[-1]) > 0
    finally:
        server.should_exit = True
        thread.join(15)
