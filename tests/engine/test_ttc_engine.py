"""best_of in the engine (SamplingParams.best_of, OpenAI's legacy semantics) and the one prefill its candidates
share: the n best by mean token logprob, exactly among the candidates n = best_of gives with the same seed; the
prompt computed once and its KV blocks shared by all candidates; nothing left behind."""
from __future__ import annotations

import random

import pytest

from tokenloom import LLM, SamplingParams

SEED, N = 1234, 8


@pytest.fixture(scope="module")
def llm(tiny_llama):
    path, _ = tiny_llama
    return LLM(str(path), dtype="float32", block_size=8, max_model_len=512)


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 320) for _ in range(length)]


def _mean(o) -> float:
    """The mean of the chosen tokens' logprobs, from the returned per-token entries."""
    return sum(entry[t] for t, entry in zip(o.token_ids, o.logprobs)) / len(o.token_ids)


def _params(**kw) -> SamplingParams:
    # stop ids drawn often enough that the candidates differ in length too
    return SamplingParams(**{"temperature": 1.0, "seed": SEED, "max_tokens": 12, "stop_token_ids": list(range(3, 23)),
                             **kw})


@pytest.mark.parametrize("keep", [1, 3])
def test_best_of_returns_the_highest_mean_logprob_candidates_of_n(llm, keep):
    prompt = _prompt(1, 21)
    llm.generate(prompt, _params(max_tokens=1))  # both runs below read its full blocks from the prefix cache
    full = llm.generate(prompt, _params(n=N, logprobs=0))[0]
    assert len(full.outputs) == N and len({tuple(o.token_ids) for o in full.outputs}) > 1
    expected = sorted(full.outputs, key=lambda o: -_mean(o))[:keep]
    best = llm.generate(prompt, _params(n=keep, best_of=N))[0]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in expected]
    assert [o.index for o in best.outputs] == list(range(keep))
    assert all(o.logprobs is None for o in best.outputs)  # not asked for: taken for the ranking only
    # every candidate is kept, in index order: the same completions n = N gives
    assert [o.token_ids for o in best.candidates] == [o.token_ids for o in full.outputs]
    asked = llm.generate(prompt, _params(n=keep, best_of=N, logprobs=2))[0]
    assert [o.token_ids for o in asked.outputs] == [o.token_ids for o in expected]
    for got, want in zip(asked.outputs, expected):
        assert len(got.logprobs) == len(got.token_ids) and all(len(e) >= 2 for e in got.logprobs)
        assert got.mean_logprob == pytest.approx(_mean(want), abs=1e-5)
    assert llm.engine.stats().num_blocks_used == 0


def test_best_of_below_n_is_refused():
    from tokenloom.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    assert SamplingParams(n=3, best_of=3).best_of == 3


@pytest.mark.parametrize("use_best_of", [True, False])
def test_eight_candidates_prefill_the_prompt_once_and_share_its_blocks(llm, use_best_of):
    engine, kv = llm.engine, llm.engine.kv_cache_manager
    engine.reset_prefix_cache()
    prompt = _prompt(7 + use_best_of, 45)  # 5 full blocks of 8 and a partial one
    before = engine.stats()
    count = dict(n=1, best_of=N) if use_best_of else dict(n=N)
    rid = engine.add_request(prompt, SamplingParams(temperature=1.0, seed=SEED, max_tokens=6, ignore_eos=True,
                                                    **count))
    while not engine.scheduler.running or len(engine.scheduler.running) < N:
        engine.step()  # the prompt's prefill; the candidates fork off the request that computed it
    running = [r for r in engine.scheduler.running if r.group_id == rid]
    assert len(running) == N
    full = len(prompt) // kv.block_size
    tables = [r.block_table[:full] for r in running]
    assert all(t == tables[0] for t in tables)  # the same physical blocks...
    assert all(kv.ref_counts[b] == N for b in tables[0])  # ...each referenced by all N candidates
    assert len({r.block_table[full] for r in running}) == 1  # the partial block too, until written (CoW)
    engine.step()
    assert len({r.block_table[full] for r in running}) == N  # each candidate's first decode copied it
    assert all(kv.ref_counts[b] == N for b in tables[0])
    while engine.has_unfinished():
        engine.step()
    after = engine.stats()
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == len(prompt)
    assert after.prompt_tokens_reused == before.prompt_tokens_reused  # computed, not served from the cache
    assert after.num_blocks_used == 0


def test_a_second_best_of_request_reuses_the_cached_prompt(llm):
    engine = llm.engine
    engine.reset_prefix_cache()
    prompt = _prompt(11, 40)
    llm.generate(prompt, _params(n=1, best_of=N, max_tokens=2))
    before = engine.stats()
    llm.generate(prompt, _params(n=2, best_of=N, max_tokens=2))
    after = engine.stats()
    # 40 tokens = 5 full blocks of 8: all but the last token come from the prefix cache
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 8
    assert after.prompt_tokens_reused - before.prompt_tokens_reused == 32


def test_aborting_a_best_of_request_frees_every_candidate(llm):
    engine = llm.engine
    rid = engine.add_request(_prompt(3, 30), SamplingParams(best_of=N, max_tokens=50, ignore_eos=True))
    outs = []
    for _ in range(3):
        outs += engine.step()
    assert not outs  # best_of shows only the final choice
    engine.abort_request(rid)
    assert not engine.has_unfinished() and engine.stats().num_blocks_used == 0
    engine.kv_cache_manager.check_invariants([])
