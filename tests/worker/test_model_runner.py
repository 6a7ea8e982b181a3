"""The model runner on a real (tiny, random) model: draft tokens verified in one forward pass keep greedy outputs
identical to plain decoding; the runner reads the scheduler output and never changes requests."""
from __future__ import annotations

import copy

import pytest

from tokenloom import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", num_blocks=64, block_size=4)


PROMPTS = [[1, 5, 9, 33, 7, 100], [3, 4, 5], [200, 201, 17, 18, 19, 20, 21, 22, 23]]


def _generate(llm, propose=None, max_tokens=24):
    eng = llm.engine
    ids = [eng.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)) for p in PROMPTS]
    final = {}
    while eng.has_unfinished():
        if propose:
            for req in eng.scheduler.running:
                propose(req)
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    return [final[i] for i in ids]


def test_verified_drafts_keep_greedy_outputs(llm):
    plain = _generate(llm)
    truth = {tuple(p): out for p, out in zip(PROMPTS, plain)}
    eng = llm.engine
    draft_before = eng.scheduler.num_draft_tokens

    def propose(req):  # the true continuation for three tokens, then a wrong one
        full = truth[tuple(req.prompt_token_ids)]
        n = len(req.output_token_ids)
        req.spec_token_ids = full[n : n + 3] + [(full[n + 3] + 1) % 320] if n + 4 <= len(full) else []

    steps_before = eng.stats().steps
    spec = _generate(llm, propose)
    assert spec == plain
    drafted = eng.scheduler.num_draft_tokens - draft_before
    assert drafted > 0 and eng.scheduler.num_accepted_tokens > 0
    assert eng.kv_cache_manager.num_used_blocks == 0
    assert eng.stats().steps - steps_before < 24  # several tokens per step


def test_runner_does_not_change_requests(llm):
    eng = llm.engine
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0))
    sched = eng.scheduler.schedule()
    req = sched.scheduled[0].request
    snapshot = copy.deepcopy((req.output_token_ids, req.num_computed_tokens, req.block_table, req.spec_token_ids))
    result = eng.executor.execute_model(sched)
    assert (req.output_token_ids, req.num_computed_tokens, req.block_table, req.spec_token_ids) == snapshot
    assert result.requests == [req] and len(result.sampled_token_ids[0]) == 1
    eng.scheduler.update_from_output(sched, result)
    while eng.has_unfinished():
        eng.step()
    assert eng.kv_cache_manager.num_used_blocks == 0
