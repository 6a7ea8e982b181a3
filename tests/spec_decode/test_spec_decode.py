"""Speculative decoding end to end (tokenloom/spec_decode/, the scheduler's accept/rollback, the runner's verify).

Exactness: greedy outputs with every method equal decoding without speculation, token for token, in float32 (mixed
batches, preemption, a stop token inside an accepted run, max_tokens inside a run). Distribution: sampled drafts
from a different model go through the rejection sampler and the kept tokens still follow the target's own
distribution (chi-square against exact probabilities from transformers; a broken residual must fail). Blocks:
every block is free at the end and the prefix cache only ever indexes real tokens, never rejected drafts.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from tests.sample.test_rejection_sampler import chi2_pvalue
from tokenloom import LLM, SamplingParams
from tokenloom.config import SpeculativeConfig, TokenloomError
from tokenloom.core.kv_cache_manager import chain_hash
from tokenloom.spec_decode.adaptive import PROBE_SHARE, AdaptiveK
from tokenloom.spec_decode.ngram import NgramProposer

METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
    "layer_skip": {"method": "layer_skip", "draft_layers": 1},
    "self": {"method": "self", "draft_quantization": "int8"},
    "draft_model": None,  # the target's own checkpoint as its draft: drafts are mostly accepted
}


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    path, hf = tiny_llama
    return str(path), hf


def _spec(name: str, path: str, **extra) -> dict:
    spec = dict(METHODS[name] or {"model": path, "num_speculative_tokens": 3})
    spec["adaptive"] = False  # verify every draft: these tests are about correctness, not speed
    spec.update(extra)
    return spec


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        motif = [rnd.randrange(3, 320) for _ in range(rnd.randint(2, 5))]
        out.append((motif * 8)[: rnd.randint(8, 30)] + [rnd.randrange(3, 320) for _ in range(rnd.randint(0, 6))])
    return out


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _check_blocks(llm: LLM, sequences: list[list[int]]) -> None:
    """All blocks free; every block the prefix cache indexes holds a prefix of a real sequence."""
    kv = llm.engine.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    kv.check_invariants([])
    real = set()
    bs = kv.block_size
    for seq in sequences:
        parent = None
        for i in range(len(seq) // bs):
            parent = chain_hash(parent, tuple(seq[i * bs : (i + 1) * bs]))
            real.add(parent)
    assert set(kv.pool.hash_to_block) <= real, "a block hashed over tokens no sequence has (a rejected draft)"


def _record_runs(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """(drafts, kept tokens) of every verify run, read off the scheduler's inputs."""
    runs = []
    sched = llm.engine.scheduler
    update = sched.update_from_output

    def spy(s, out):
        for item in s.scheduled:
            if item.spec_token_ids and item.request in out.requests:
                runs.append((list(item.spec_token_ids), list(out.sampled_token_ids[out.requests.index(item.request)])))
        return update(s, out)

    sched.update_from_output = spy
    return runs


@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_outputs_equal_no_speculation(tiny, method):
    """A mixed batch (different lengths, penalties, logit bias, min_tokens, one request sampling) with every
    method: greedy rows equal plain decoding (each verify position sees the earlier drafts as output) and drafts
    were really verified and accepted."""
    path, _ = tiny
    prompts = _prompts(7, seed=1)
    greedy = dict(max_tokens=40, temperature=0)
    params = [SamplingParams(**greedy, ignore_eos=True), SamplingParams(**greedy, ignore_eos=True),
              SamplingParams(**greedy, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(**greedy, presence_penalty=0.4, frequency_penalty=0.6, ignore_eos=True),
              SamplingParams(**greedy, logit_bias={17: 2.5, 40: -3.0}, ignore_eos=True),
              SamplingParams(**greedy, min_tokens=30, stop_token_ids=[5, 9, 11]),
              SamplingParams(max_tokens=40, temperature=0.8, seed=3, ignore_eos=True)]
    ref = _tokens(LLM(path, dtype="float32").generate(prompts, params))
    llm = LLM(path, dtype="float32", speculative_config=_spec(method, path))
    runs = _record_runs(llm)
    outs = _tokens(llm.generate(prompts, params))
    assert outs[:6] == ref[:6]
    assert len(outs[6]) == 40 and len(outs[5]) >= 30
    st = llm.engine.stats()
    assert st.spec_draft_tokens > 0 and st.spec_accepted_tokens > 0, "no draft was accepted: nothing was tested"
    assert any(len(kept) > 1 for _, kept in runs)
    _check_blocks(llm, [p + o for p, o in zip(prompts, outs)])


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_stop_token_and_max_tokens_inside_an_accepted_run(tiny, method):
    """A stop token met inside a run of accepted drafts ends the output there (the rest of the run is dropped);
    max_tokens falling inside a run likewise."""
    path, _ = tiny
    prompts = _prompts(6, seed=2)
    long = _tokens(LLM(path, dtype="float32").generate(prompts, SamplingParams(max_tokens=48, temperature=0,
                                                                               ignore_eos=True)))
    # a stop token per prompt: one its greedy output first produces well inside the output
    stops = [next((t for i, t in enumerate(o) if i >= 6 and t not in o[:i]), o[-1]) for o in long]
    llm = LLM(path, dtype="float32", speculative_config=_spec(method, path))
    runs = _record_runs(llm)
    for max_tokens in (7, 13, 22):
        params = [SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[s]) for s in stops]
        outs = llm.generate(prompts, params)
        for o, ref, s in zip(outs, long, stops):
            got = list(o.outputs[0].token_ids)
            cut = ref.index(s) + 1 if s in ref[:max_tokens] else max_tokens
            assert got == ref[:cut]
            assert o.outputs[0].finish_reason == ("stop" if cut < max_tokens or ref[cut - 1] == s else "length")
    if method == "draft_model":  # drafts from the target's own weights: the stop token is drafted too
        assert any(any(t in stops for t in kept[:-1]) for _, kept in runs), "no stop token inside an accepted run"
    assert any(len(kept) > 1 for _, kept in runs)
    _check_blocks(llm, [p + o for p, o in zip(prompts, long)])


def test_preemption_mid_speculation(tiny):
    """A KV cache too small for the batch: requests are preempted while speculating, recomputed, and the outputs
    still equal plain decoding; every block comes back."""
    path, _ = tiny
    prompts = _prompts(8, seed=3)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    ref = _tokens(LLM(path, dtype="float32").generate(prompts, params))
    for method in ("ngram", "draft_model"):
        llm = LLM(path, dtype="float32", num_blocks=14, block_size=8, speculative_config=_spec(method, path))
        outs = _tokens(llm.generate(prompts, params))
        assert outs == ref
        st = llm.engine.stats()
        assert st.num_preemptions > 0 and st.spec_accepted_tokens > 0
        _check_blocks(llm, [p + o for p, o in zip(prompts, outs)])


def test_abort_mid_speculation(tiny):
    path, _ = tiny
    llm = LLM(path, dtype="float32", speculative_config=_spec("draft_model", path))
    eng = llm.engine
    for i, p in enumerate(_prompts(4, seed=4)):
        eng.add_request(p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), request_id=f"r{i}")
    for _ in range(4):
        eng.step()
    assert any(r.spec_token_ids for r in eng.scheduler.running), "abort while drafts are pending"
    eng.abort_request("r1")
    eng.abort_request("r2")
    while eng.has_unfinished():
        eng.step()
    kv = eng.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    # the worker hears of finished requests with the next step that runs, and drops their draft state then
    llm.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0), )
    assert set(eng.runner.speculator.proposer.seen) <= {"req-0#0"}


def test_sampled_drafts_keep_the_target_distribution(tiny, monkeypatch):
    """A different draft (the target quantized to int4) samples its drafts at temperature 1 with top-k: the
    rejection sampler must keep the target's distribution. The pair (token 1, token 2) of many completions against
    its exact probability from transformers' float64 forward of the same weights; token 2 was verified as a
    draft. A residual that ignores q (resampling from p after a rejection) must fail."""
    path, hf = tiny
    prompt = [7, 41, 99, 7, 41]
    top_k, n = 6, 3000
    hf = hf.double()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        p1 = _truncated(hf(ids).logits[0, -1], top_k)
        firsts = p1.nonzero()[:, 0]
        nxt = hf(torch.cat([ids.repeat(len(firsts), 1), firsts[:, None]], 1)).logits[:, -1]
        joint = torch.zeros(320, 320, dtype=torch.float64)
        for j, t in enumerate(firsts.tolist()):
            joint[t] = p1[t] * _truncated(nxt[j], top_k)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, ignore_eos=True)

    def pairs(llm):
        outs = _tokens(llm.generate([prompt] * n, params))
        counts = np.zeros((320, 320))
        for o in outs:
            counts[o[0], o[1]] += 1
        return counts

    spec = {"method": "self", "draft_quantization": "int4", "num_speculative_tokens": 2, "adaptive": False}
    llm = LLM(path, dtype="float32", max_num_seqs=256, seed=5, speculative_config=spec)
    counts = pairs(llm)
    st = llm.engine.stats()
    assert st.spec_draft_tokens >= n and 0 < st.spec_accepted_tokens < st.spec_draft_tokens
    assert llm.engine.runner.speculator.proposer.runner is not None
    assert chi2_pvalue(counts, joint.numpy()) > 1e-3

    import tokenloom.sample.rejection_sampler as rs

    monkeypatch.setattr(rs, "residual_distribution", lambda p, q: p / p.sum())
    assert chi2_pvalue(pairs(llm), joint.numpy()) < 1e-6


def _truncated(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    v = logits.topk(top_k).values[-1]
    p = torch.softmax(logits.masked_fill(logits < v, float("-inf")), -1)
    return p


@pytest.mark.slow
def test_default_model_greedy_equal_in_float32(default_llm):
    """The default model in float32: n-gram and layer-skip speculation give plain decoding's tokens on chats that
    quote their input (where drafts are accepted) and open ones."""
    msgs = ["Repeat exactly: the whale, the sea, the ship and the whale again; the sea, the ship.",
            "Write two sentences about autumn."]
    prompts = [default_llm.chat_prompt_ids([{"role": "user", "content": m}]) for m in msgs]
    params = SamplingParams(max_tokens=48, temperature=0)
    ref = _tokens(default_llm.generate(prompts, params))
    for spec in ({"method": "ngram", "num_speculative_tokens": 6, "adaptive": False},
                 {"method": "layer_skip", "draft_layers": 10, "adaptive": False}):
        llm = LLM("smollm2-135m", dtype="float32", max_model_len=2048, speculative_config=spec)
        outs = [_tokens(llm.generate([p], params))[0] for p in prompts]  # batch 1
        assert outs == ref
        assert _tokens(llm.generate(prompts, params)) == ref  # and batched
        assert llm.engine.stats().spec_accepted_tokens > 0
        _check_blocks(llm, [p + o for p, o in zip(prompts, outs)])


# ---- the parts -------------------------------------------------------------------------------------------------
def _longest_earlier_match(tokens: list[int], lo: int, hi: int) -> tuple[int, int | None]:
    """Brute force: the longest suffix (lo..hi tokens) that also ends earlier, and its latest earlier end."""
    last = len(tokens) - 1
    for n in range(min(hi, last), lo - 1, -1):
        suffix = tokens[last - n + 1 :]
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                return n, end
    return 0, None


def test_ngram_lookup_matches_brute_force():
    rnd = random.Random(0)
    for trial in range(300):
        lo, hi = rnd.choice([(1, 4), (2, 3), (1, 1), (3, 5)])
        prop = NgramProposer(5, hi, lo)
        tokens = [rnd.randrange(4) for _ in range(rnd.randint(1, 6))]
        for _ in range(rnd.randint(1, 12)):  # grown step by step, as a request's output
            n, end = _longest_earlier_match(tokens, lo, hi)
            got_n, drafts = prop.lookup("r", tokens, 5)
            assert got_n == n
            if end is None:
                assert drafts == []
            else:
                period = len(tokens) - 1 - end
                assert drafts == [tokens[end + 1 + j % period] for j in range(5)]
            tokens += [rnd.randrange(4) for _ in range(rnd.randint(1, 3))]


def test_adaptive_k_plans_a_closed_batch_for_its_longest_request():
    """With nobody waiting for a slot, a batch runs until its longest request is done: drafts that speed up only
    some of the requests left with the most to do add rows to every step and save none. Rows cost a tenth of a
    one-request step: for tokens per second, the well-drafting request of a pair gets drafts; planned for the
    batch's end, only when its partner drafts well too, both then; a request about to end does not hold the
    others back."""
    ak = AdaptiveK(8)
    for rows in range(1, 20):
        ak.cost.observe(rows, 1.0 + 0.1 * (rows - 1))
    for _ in range(30):
        ak.observe(("good", 4), 8, 8)
        ak.observe(("good2", 4), 8, 8)
        ak.observe(("bad", 1), 1, 0)
    pair = [("good", 4), ("bad", 1)]
    assert ak.plan(pair, [8, 8])[0] > 0  # tokens per second: the good one drafts
    assert ak.plan(pair, [8, 8], remaining=[100, 100]) == [0, 0]  # its drafts would not end the batch sooner
    both = ak.plan([("good", 4), ("good2", 4)], [8, 8], remaining=[100, 100])
    assert both[0] > 0 and both[1] > 0 and abs(both[0] - both[1]) <= 1
    ending = ak.plan(pair, [8, 8], remaining=[100, 20])  # the bad one is nearly done: the good one sets the pace
    assert ending[0] > 0 and ending[1] == 0


def test_adaptive_k_follows_acceptance_and_cost():
    ak = AdaptiveK(8)
    for rows in range(1, 10):  # each row costs a fifth of a one-row step
        ak.cost.observe(rows, 1.0 + 0.2 * (rows - 1))
    for _ in range(30):
        ak.observe(("good", 4), 8, 8)
        ak.observe(("bad", 1), 1, 0)
    assert ak.plan([("good", 4)], [8]) == [8]
    assert ak.plan([("bad", 1)], [8]) == [0]
    # a new request starts from what this kind of draft has earned, with short runs until its own first ones
    assert ak.plan([("new", 4)], [8]) == [2]
    ak.observe(("new", 4), 2, 2)
    ak.observe(("new", 4), 2, 2)
    assert ak.plan([("new", 4)], [8])[0] >= 4
    expensive = AdaptiveK(8)
    for rows in range(1, 10):  # each row costs as much as a step: no draft ever pays
        expensive.cost.observe(rows, float(rows))
    assert expensive.plan([("r", 0)], [8]) == [0]
    assert AdaptiveK(8, enabled=False).plan([("r", 0)], [5]) == [5]
    # one outlier (a first touch of memory, a noisy neighbour) must not price drafts out for good
    spiky = AdaptiveK(8)
    for _ in range(10):
        spiky.cost.observe(1, 1.0)
    spiky.cost.observe(9, 60.0)
    for _ in range(30):
        spiky.observe(("good", 4), 8, 8)
    assert spiky.plan([("good", 4)], [8])[0] > 0
    # and a plan that keeps verifying nothing verifies its likeliest draft now and then, to measure afresh
    stale = AdaptiveK(8)
    for rows in range(1, 10):
        stale.cost.observe(rows, float(rows))
    for _ in range(30):
        stale.observe(("ok", 2), 4, 3)
    plans = [stale.plan([("ok", 2)], [4])[0] for _ in range(200)]
    assert 0 < sum(plans) <= 200 // 32


def test_costly_proposer_probes_stay_within_their_share_of_the_time():
    """A paused model draft is probed now and then; a probe that costs as much as 40 one-row steps (a draft model
    catching up on a request's whole context) must not come back sooner than PROBE_SHARE of the time allows."""
    ak = AdaptiveK(4, cheap=False)
    for rows in range(1, 6):
        ak.cost.observe(rows, 0.01 * rows)  # every row as costly as a step: drafts never pay
    probes = []
    for step in range(20000):
        ks = ak.probe(ak.plan([("r", 0)], [4], draft_step_cost=0.2), [4])
        if any(ks):
            probes.append(step)
            ak.probed(0.4)
    assert probes, "a paused proposer is still probed"
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps and all(g >= 0.4 / (PROBE_SHARE * 0.01) for g in gaps), gaps
    assert 0.4 * len(probes) <= 2 * PROBE_SHARE * 0.01 * 20000


def test_speculative_config_validation(tiny):
    path, _ = tiny
    assert SpeculativeConfig.parse('{"model": "x"}').method == "draft_model"
    for bad in ('{"method": "magic"}', '{"num_speculative_tokens": 0}', '{"num_speculative_tokens": "4"}',
                '{"methd": "ngram"}', "not json", '{"method": "draft_model"}', "[1]"):
        with pytest.raises(TokenloomError):
            SpeculativeConfig.parse(bad)
    with pytest.raises(TokenloomError, match="draft_layers"):
        LLM(path, dtype="float32", speculative_config={"method": "layer_skip", "draft_layers": 2})


def test_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    path, _ = tiny
    make_tiny("llama", tmp_path, vocab_size=256)
    with pytest.raises(TokenloomError, match="vocabulary"):
        LLM(path, dtype="float32", speculative_config={"model": str(tmp_path)})


@pytest.mark.slow
@pytest.mark.parametrize("int8_tiles", ["1", "0"], ids=["amx-int8", "avx512"])
def test_draft_rows_equal_one_token_decodes(monkeypatch, int8_tiles):
    """The compiled stack verifying a sequence's drafts as extra rows (the 4- and 8-bit kernels that meet several
    activation rows per weight load: the AMX int8 tiles, up to 16 rows a pass in groups of 4, or the AVX-512
    kernels) gives each row the logits a one-token decode at that position gives, to the bit: so verifying never
    changes a greedy token."""
    monkeypatch.setenv("TOKENLOOM_AMX_INT8", int8_tiles)
    llm = LLM("smollm2-135m", num_blocks=64)  # the GGUF file's own Q4_1 / Q8_0 blocks
    fused = llm.engine.runner.fused
    kernels = set(fused.kernels)
    if int8_tiles == "1" and not {"u4-amx8+f16", "u8-amx8+f16"} <= kernels:
        pytest.skip(f"no AMX int8 tiles on this CPU (kernels: {kernels})")
    if int8_tiles == "0":
        assert {"u4-i16+f16", "u8-i16+f16"} <= kernels  # the multi-row kernels' formats
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (300,))
    table = [list(range(20))]

    def rows(start, n):
        return fused.token_logits(ids[start : start + n], torch.arange(start, start + n), table, [n])

    for s in range(0, 288, 16):
        rows(s, 16)
    cache = llm.engine.runner.kv_cache
    saved = cache.clone()
    for n in (2, 3, 5, 9, 12):
        multi = rows(288, n)
        cache.copy_(saved)
        single = torch.cat([rows(288 + j, 1) for j in range(n)])
        cache.copy_(saved)
        assert torch.equal(multi, single)
