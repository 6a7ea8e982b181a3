"""The scheduler driven by a fake model runner: chunked prefill, budgets, preemption, forks, token-level stops,
and speculative tokens accepted several per step or rolled back. The fake runner's "model" is a fixed rule (the
next token is the previous one + 1), so every expected output is known exactly."""
from __future__ import annotations

import pytest

from tokenloom.config import SchedulerConfig
from tokenloom.core.kv_cache_manager import KVCacheManager
from tokenloom.core.request import Request
from tokenloom.core.scheduler import Scheduler
from tokenloom.sampling_params import SamplingParams
from tokenloom.worker.outputs import ModelRunnerOutput

V = 1000
EOS = 999


def rule(token: int) -> int:
    return (token + 1) % V


class FakeRunner:
    """Produces what a model following `rule` would: for a request that caught up, its next token; for one with
    draft tokens, the drafts while they match the rule, then the rule's token."""

    def __init__(self):
        self.seen_tokens = 0

    def execute(self, sched) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        for item in sched.scheduled:
            req, n, drafts = item.request, item.num_tokens, item.spec_token_ids
            self.seen_tokens += n
            assert req.num_computed_tokens + n - len(drafts) <= req.num_tokens
            assert len(req.block_table) * 4 >= req.num_computed_tokens + n  # slots for every token computed
            if req.num_computed_tokens + n - len(drafts) < req.num_tokens:
                continue  # a prefill chunk that has not caught up yet
            kept, last = [], req.all_token_ids[-1]
            for d in drafts:
                kept.append(rule(last))
                if kept[-1] != d:
                    break
                last = d
            else:
                kept.append(rule(last))
            for r in [req] + req.forks:
                out.requests.append(r)
                out.sampled_token_ids.append(list(kept) if r is req else kept[:1])
                out.logprobs.append(None)
        return out


def make(budget=8, num_blocks=64, max_num_seqs=8, max_model_len=256):
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs, budget), kv, max_model_len, eos_token_ids=(EOS,))
    return sched, kv, FakeRunner()


def request(rid, prompt, max_tokens=10, **params):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), max_tokens)


def run(sched, runner, propose=None, max_steps=500):
    steps = 0
    while sched.has_unfinished():
        if propose:
            for req in sched.running:
                propose(req)
        out = sched.schedule()
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        gained = sched.update_from_output(out, runner.execute(out))
        for req, n in gained:
            assert n >= 1
        for req in sched.running:
            assert req.num_computed_tokens <= req.num_tokens
        steps += 1
        assert steps < max_steps, "scheduler did not finish"
    return steps


def expected(prompt, n):
    out, last = [], prompt[-1]
    for _ in range(n):
        last = rule(last)
        out.append(last)
    return out


def test_chunked_prefill_and_decode_under_a_budget():
    sched, kv, runner = make(budget=5)
    reqs = [request(str(i), range(10 * i + 1, 10 * i + 1 + 7 + i), max_tokens=6) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    run(sched, runner)
    for r in reqs:
        assert r.output_token_ids == expected(r.prompt_token_ids, 6)
        assert r.finish_reason == "length"
    assert kv.num_used_blocks == 0


def test_preemption_recomputes_and_loses_nothing():
    sched, kv, runner = make(budget=16, num_blocks=9)
    reqs = [request(str(i), range(100 * i + 1, 100 * i + 9), max_tokens=12) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    run(sched, runner)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == expected(r.prompt_token_ids, 12)
    assert kv.num_used_blocks == 0


def test_eos_and_stop_token_ids_respect_min_tokens():
    sched, kv, runner = make()
    eos = request("eos", [EOS - 3], max_tokens=10)  # emits 997, 998, 999=EOS
    stop = request("stop", [20], max_tokens=10, stop_token_ids=[22])
    late = request("late", [EOS - 2], max_tokens=5, min_tokens=3)  # EOS at token 2 is ignored: 998, 999, 0, 1, 2
    for r in (eos, stop, late):
        sched.add_request(r)
    run(sched, runner)
    assert eos.output_token_ids == [997, 998, EOS] and (eos.finish_reason, eos.stop_reason) == ("stop", None)
    assert stop.output_token_ids == [21, 22] and (stop.finish_reason, stop.stop_reason) == ("stop", 22)
    assert late.output_token_ids == [998, EOS, 0, 1, 2] and late.finish_reason == "length"


@pytest.mark.parametrize("right", [0, 1, 2, 3])
def test_draft_tokens_accepted_several_per_step_or_rolled_back(right):
    """Drafts of which the first `right` follow the rule: the step keeps those plus one token, and the KV of the
    rejected ones is rolled back (num_computed_tokens counts only kept tokens)."""
    sched, kv, runner = make(budget=32)
    req = request("r", [1, 2, 3, 4, 5], max_tokens=40)
    sched.add_request(req)
    sched.update_from_output(out := sched.schedule(), runner.execute(out))  # prefill, first token (6)
    assert req.output_token_ids == [6]
    req.spec_token_ids = [7, 8, 9][:right] + [500, 501, 502][: 3 - right]
    before = req.num_computed_tokens
    out = sched.schedule()
    assert out.scheduled[0].num_tokens == 4 and out.scheduled[0].spec_token_ids == req.spec_token_ids
    gained = sched.update_from_output(out, runner.execute(out))
    assert gained == [(req, right + 1)]
    assert req.output_token_ids == [6] + [7, 8, 9, 10][: right + 1]
    assert req.num_computed_tokens == before + 1 + right == req.num_tokens - 1
    assert req.spec_token_ids == []
    assert sched.num_draft_tokens == 3 and sched.num_accepted_tokens == right


def test_speculation_end_to_end_matches_plain_decoding():
    """A proposer that is right most of the time: the output equals decoding without drafts, in fewer steps."""
    def propose(req):  # right three times, then wrong once
        last = req.all_token_ids[-1]
        req.spec_token_ids = [rule(last), rule(rule(last)), rule(rule(rule(last))), 7][: 1 + len(req.output_token_ids) % 4]

    reqs = {}
    steps = {}
    for mode in ("plain", "spec"):
        sched, kv, runner = make(budget=64)
        reqs[mode] = [request(f"{mode}{i}", range(10 * i + 1, 10 * i + 9), max_tokens=30) for i in range(3)]
        for r in reqs[mode]:
            sched.add_request(r)
        steps[mode] = run(sched, runner, propose if mode == "spec" else None)
        assert kv.num_used_blocks == 0
    for plain, spec in zip(reqs["plain"], reqs["spec"]):
        assert spec.output_token_ids == plain.output_token_ids == expected(plain.prompt_token_ids, 30)
    assert steps["spec"] < steps["plain"]


def test_stop_inside_an_accepted_run_truncates_it():
    sched, kv, runner = make(budget=32)
    req = request("r", [EOS - 4], max_tokens=20)
    sched.add_request(req)
    sched.update_from_output(out := sched.schedule(), runner.execute(out))  # 996
    req.spec_token_ids = [997, 998, EOS, 0]
    sched.update_from_output(out := sched.schedule(), runner.execute(out))
    assert req.output_token_ids == [996, 997, 998, EOS] and req.finish_reason == "stop"
    assert req.is_finished and kv.num_used_blocks == 0


def test_drafts_never_pass_max_tokens_or_the_context():
    sched, kv, runner = make(budget=32, max_model_len=12)
    req = request("r", range(1, 9), max_tokens=4)
    sched.add_request(req)
    sched.update_from_output(out := sched.schedule(), runner.execute(out))
    req.spec_token_ids = [10, 11, 12, 13, 14]
    out = sched.schedule()
    # 9 tokens now: the context (12) leaves room for 2 more tokens after the next one, max_tokens (4) for 2 drafts
    assert out.scheduled[0].spec_token_ids == [10, 11]
    sched.update_from_output(out, runner.execute(out))
    assert req.output_token_ids == [9, 10, 11, 12] and req.finish_reason == "length"


def test_forks_share_the_prompt_and_finish_independently():
    sched, kv, runner = make()
    parent = request("p#0", [5, 6, 7, 8, 9], max_tokens=3)
    child = request("p#1", [5, 6, 7, 8, 9], max_tokens=5)
    parent.forks, child.fork_of = [child], parent
    sched.add_request(parent)
    run(sched, runner)
    assert parent.output_token_ids == [10, 11, 12] and child.output_token_ids == [10, 11, 12, 13, 14]
    assert kv.num_used_blocks == 0
