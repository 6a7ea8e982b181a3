"""Data-parallel replicas (`tokenloom serve MODEL --data-parallel-size N`): engines in worker processes behind one
front serve concurrent requests with the tokens one in-process engine gives; a killed replica fails its own
requests with an error (never a hang) and the others go on serving."""
from __future__ import annotations

import asyncio
import random

import pytest

from tokenloom import LLM, SamplingParams
from tokenloom.config import CacheConfig, EngineConfig, TokenloomError
from tokenloom.engine.async_engine import EngineDeadError
from tokenloom.engine.data_parallel import DataParallelEngine, merge_stats


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def replicas(tiny_llama):
    engine = DataParallelEngine(EngineConfig(model=str(tiny_llama[0]), dtype="float32",
                                             cache=CacheConfig(num_blocks=64)), size=2, threads=1)
    yield engine
    engine.shutdown()


def test_replicas_serve_concurrent_requests_like_one_engine(tiny_llama, replicas):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(5, 40))] for _ in range(8)]
    ref = [o.outputs[0].token_ids for o in LLM(str(tiny_llama[0]), dtype="float32").generate(prompts, _greedy(10))]

    async def main():
        streams = [await replicas.add_request(p, _greedy(10)) for p in prompts]
        return [(await s.collect()).outputs[0].token_ids for s in streams]

    assert asyncio.run(main()) == ref
    per_replica = [w.stats() for w in replicas.workers]
    assert all(st.steps > 0 for st in per_replica)  # both took requests (least loaded first)
    merged = replicas.stats()
    assert merged.steps == sum(st.steps for st in per_replica)
    assert merged.num_blocks_total == 128
    assert merged.tokens_computed == sum(st.tokens_computed for st in per_replica)


def test_merge_stats_weights_ratios():
    from tokenloom.engine.outputs import EngineStats

    def stats(used, total, computed, reused, hit):
        return EngineStats(0, 0, total, used, total - used, used / total, hit, computed, reused, 0, 0, 0.0, 0.0, 1)

    merged = merge_stats([stats(10, 100, 30, 10, 0.25), stats(30, 100, 0, 0, 0.0)])
    assert merged.kv_cache_usage == pytest.approx(0.2)
    assert merged.prefix_cache_hit_rate == pytest.approx(0.25)  # the idle replica weighs nothing


def test_killed_replica_fails_its_requests_and_the_others_serve(replicas):
    async def main():
        a = await replicas.add_request([5, 6, 7], _greedy(400))
        b = await replicas.add_request([8, 9, 10], _greedy(400))
        victim = next(w for w in replicas.workers if a.request_id in w._streams)
        await a.__anext__()
        victim.process.kill()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(a.collect(), 10)
        survivor = (await asyncio.wait_for(b.collect(), 60)).outputs[0].token_ids
        assert len(survivor) == 400
        after = await replicas.add_request([1, 2, 3], _greedy(4))  # goes to the live replica
        assert len((await asyncio.wait_for(after.collect(), 30)).outputs[0].token_ids) == 4
        assert replicas.is_running

    asyncio.run(main())


def test_bad_sizes_are_refused(tiny_llama):
    with pytest.raises(TokenloomError, match="at least 1"):
        DataParallelEngine(EngineConfig(model=str(tiny_llama[0])), size=0)


def test_serve_flags_are_checked_before_anything_starts():
    from tokenloom.cli.main import build_parser
    from tokenloom.entrypoints.scale_out import make_worker_engine, wants_workers

    parse = build_parser().parse_args
    assert not wants_workers(parse(["serve", "m"]))
    cases = {("--prefill-workers", "1"): "both", ("--prefill-workers", "1", "--decode-workers", "1", "-dp", "2"):
             "do not combine", ("--data-parallel-size", "2", "--enable-lora"): "LoRA"}
    for flags, message in cases.items():
        ns = parse(["serve", "m", *flags])
        assert wants_workers(ns)
        with pytest.raises(TokenloomError, match=message):
            make_worker_engine(ns)
