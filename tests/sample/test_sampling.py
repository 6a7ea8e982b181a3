"""Sampling (issue 4): every control, per request, inside one batch.

Distributions are checked with chi-square tests against exact distributions computed independently here (numpy,
float64); penalties against transformers' processor and OpenAI's documented formula; logprobs against
transformers on the same weights; then reproducibility, n > 1 with shared prompt blocks, stop handling and
validation through the engine.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tokenloom import LLM, SamplingParams
from tokenloom.config import TokenloomError
from tokenloom.sample import Sampler as _Sampler
from tokenloom.sample import SamplingMetadata, SamplingRow
from tokenloom.sample.logits_processors import apply_penalties as _apply_penalties
from tokenloom.sampling_params import SamplingParamsError


class Sampler(_Sampler):
    """The tests hand over rows; the metadata is built from them as the model runner does."""

    def __call__(self, logits, rows, **kw):
        return super().__call__(logits, SamplingMetadata.from_rows(rows, logits.device), **kw)


def apply_penalties(logits, rows):
    return _apply_penalties(logits, SamplingMetadata.from_rows(rows, logits.device))


P_MIN = 1e-4  # chi-square p-value threshold: a correct sampler fails with probability 1e-4 per test (seeds fixed)
DRAWS = 20_000


# ---- an independent reference ---------------------------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x[np.isfinite(x)].max()
    e = np.where(np.isfinite(x), np.exp(x), 0.0)
    return e / e.sum()


def reference_probs(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, *, top_p_off_by_one=False,
                    min_p_before_temperature=False) -> np.ndarray:
    """vLLM semantics: temperature, then top-k, then top-p (smallest prefix of the sorted, renormalised top-k
    distribution whose mass reaches top_p), then min-p (tokens below min_p x the top probability), each step
    renormalising. The keyword flags build deliberately wrong variants for the negative controls."""
    raw = np.asarray(logits, dtype=np.float64)
    x = raw / temperature
    p = _softmax(x)
    if top_k > 0:
        kth = np.sort(x)[::-1][top_k - 1]
        p = np.where(x >= kth, p, 0.0)
        p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        before = cum - p[order]
        # the test's own sanity: no nucleus boundary within float error of top_p
        assert np.abs(cum - top_p).min() > 1e-4, "pick a top_p away from a cumulative boundary"
        keep = (cum <= top_p) if top_p_off_by_one else (before < top_p)
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    if min_p > 0:
        ref = _softmax(raw) if min_p_before_temperature else p
        p = np.where(ref >= min_p * ref.max(), p, 0.0)
        p /= p.sum()
    return p


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of the counts under probs; 0.0 when a token of probability 0 was drawn."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    n = counts.sum()
    support = np.flatnonzero(probs > 0)
    obs, exp = counts[support], probs[support] * n
    if len(support) == 1:
        return 1.0
    # pool the bins expected to hold fewer than 5 draws (chi-square's validity condition)
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
        if exp[-1] < 5 and len(exp) > 2:  # still small: fold into the smallest large bin
            j = int(np.argmin(exp[:-1]))
            obs[j] += obs[-1]
            exp[j] += exp[-1]
            obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)


def _logits(v: int = 32, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * scale  # distinct values: no ties to break


def _draw(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS, seed: int = 0,
          seeded: bool = False) -> np.ndarray:
    """n draws from one batched Sampler call over the same logits row repeated; returns counts per token."""
    gen = torch.Generator().manual_seed(seed + 1) if seeded else None
    rows = [SamplingRow(params, [], [], gen)] * n
    sampler = Sampler(torch.Generator().manual_seed(seed))
    out = sampler(logits.expand(n, -1).clone(), rows)
    return np.bincount(np.asarray(out.token_ids), minlength=logits.shape[0])


SETTINGS = {
    "temperature=1": dict(temperature=1.0),
    "temperature=0.6": dict(temperature=0.6),
    "temperature=1.7": dict(temperature=1.7),
    "top_k=5": dict(temperature=1.0, top_k=5),
    "top_k=12,T=0.8": dict(temperature=0.8, top_k=12),
    "top_p=0.6": dict(temperature=1.0, top_p=0.6),
    "top_p=0.93,T=1.5": dict(temperature=1.5, top_p=0.93),
    "min_p=0.1": dict(temperature=1.0, min_p=0.1),
    "min_p=0.3,T=1.4": dict(temperature=1.4, min_p=0.3),
    "top_k+top_p": dict(temperature=1.2, top_k=10, top_p=0.77),
    "top_k+min_p": dict(temperature=0.9, top_k=8, min_p=0.15),
    "top_p+min_p": dict(temperature=1.3, top_p=0.87, min_p=0.12),
    "top_k+top_p+min_p": dict(temperature=1.6, top_k=15, top_p=0.91, min_p=0.08),
    "top_k=1": dict(temperature=1.0, top_k=1),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_distribution_matches_reference(name):
    kw = SETTINGS[name]
    logits = _logits()
    probs = reference_probs(logits.numpy(), **kw)
    counts = _draw(logits, SamplingParams(**kw), seed=list(SETTINGS).index(name))
    assert counts[probs == 0].sum() == 0, f"{name}: drew tokens outside the allowed set"
    assert chi2_pvalue(counts, probs) > P_MIN, name


@pytest.mark.parametrize("name", ["top_p=0.6", "top_k+top_p+min_p", "temperature=0.6"])
def test_seeded_rows_draw_from_the_same_distribution(name):
    """The per-request generator path (one generator for every row here) samples the same distribution."""
    kw = SETTINGS[name]
    logits = _logits(seed=3)
    counts = _draw(logits, SamplingParams(**kw), n=8000, seeded=True)
    assert chi2_pvalue(counts, reference_probs(logits.numpy(), **kw)) > P_MIN


def test_negative_controls_reject_wrong_distributions():
    """The chi-square check has power: close-but-wrong references are rejected for the same draws."""
    logits = _logits()
    cases = [
        (dict(temperature=1.0, top_p=0.6), dict(top_p_off_by_one=True)),  # nucleus one token short
        (dict(temperature=1.0, top_k=5), dict(top_k=6)),  # one token too many
        (dict(temperature=1.4, min_p=0.3), dict(min_p_before_temperature=True)),  # floor on untempered probs
        (dict(temperature=0.6), dict(temperature=0.7)),  # slightly wrong temperature
    ]
    for kw, wrong in cases:
        counts = _draw(logits, SamplingParams(**kw), seed=11)
        assert chi2_pvalue(counts, reference_probs(logits.numpy(), **kw)) > P_MIN, kw
        assert chi2_pvalue(counts, reference_probs(logits.numpy(), **{**kw, **wrong})) < P_MIN, (kw, wrong)
    # top-p "without renormalisation", i.e. sampling the whole distribution: tokens outside the nucleus appear
    full = _draw(logits, SamplingParams(temperature=1.0), seed=11)
    assert chi2_pvalue(full, reference_probs(logits.numpy(), top_p=0.6)) == 0.0


def test_each_row_uses_its_own_settings_in_one_batch():
    """Rows with different settings (and different logits) interleaved in one call: each matches its own
    reference; greedy rows are the argmax."""
    names = ["top_k=5", "top_p=0.6", "min_p=0.3,T=1.4", "temperature=1.7", "top_k+top_p"]
    logits = [_logits(seed=10 + i) for i in range(len(names))]
    per = 6000
    batch, rows = [], []
    for j in range(per):
        for i, name in enumerate(names):
            batch.append(logits[i])
            rows.append(SamplingRow(SamplingParams(**SETTINGS[name]), [], [], None))
        batch.append(logits[0])
        rows.append(SamplingRow(SamplingParams(temperature=0), [], [], None))
    out = Sampler(torch.Generator().manual_seed(5))(torch.stack(batch), rows)
    tokens = np.asarray(out.token_ids).reshape(per, len(names) + 1)
    for i, name in enumerate(names):
        counts = np.bincount(tokens[:, i], minlength=32)
        assert chi2_pvalue(counts, reference_probs(logits[i].numpy(), **SETTINGS[name])) > P_MIN, name
    assert (tokens[:, -1] == int(logits[0].argmax())).all()


def test_greedy_tiny_temperature_bf16_and_input_untouched():
    logits = _logits().expand(5, -1).clone()
    before = logits.clone()
    top = int(before[0].argmax())
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias={3: 50.0}), [], [], None),
            SamplingRow(SamplingParams(temperature=0), [], [], None),
            SamplingRow(SamplingParams(temperature=1e-38), [], [], None),  # tiny temperature: greedy, no NaN
            SamplingRow(SamplingParams(temperature=1.0, top_k=1), [], [], None),
            SamplingRow(SamplingParams(temperature=0, repetition_penalty=1e6, presence_penalty=2, min_tokens=3,
                                       logprobs=2), [top, 1, 1], [top, 7], None, (4, 7))]
    sampler = Sampler(torch.Generator().manual_seed(0))
    out = sampler(logits, rows)
    assert out.token_ids[:4] == [3, top, top, top] and out.token_ids[4] not in (top, 1, 4, 7)
    # edits are sparse and in place, and undone: the caller's logits come back bit for bit
    assert torch.equal(logits, before), "the sampler must not modify the caller's logits"
    assert sampler(logits.bfloat16(), rows).token_ids[:4] == [3, top, top, top]  # bf16 logits are fine too


def test_top_p_and_top_k_on_a_large_vocabulary():
    """A realistic vocabulary (49152, bf16-rounded logits, so many ties) with mixed rows: draws stay inside
    each row's allowed set, computed here from a full sort."""
    V, B = 49152, 16
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, V, generator=g) * 3).bfloat16().float()
    logits[::3, :5] += 12  # some peaked rows, some flat
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in [(1.0, -1, 0.9, 0.0), (0.7, 40, 1.0, 0.0), (1.0, 50, 0.95, 0.0),
                                 (1.3, -1, 0.5, 0.0), (0.8, -1, 1.0, 0.1), (1.0, 3000, 0.99, 0.0),
                                 (1.0, -1, 0.999, 0.0), (1.0, 2, 1.0, 0.0)]]
    rows = [SamplingRow(params[i % len(params)], [], [], None) for i in range(B)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    drawn = torch.tensor([sampler(logits, rows).token_ids for _ in range(8)])  # [8, B]
    for i, r in enumerate(rows):
        p = r.params
        x = logits[i].double() / p.temperature
        prob = x.softmax(-1)
        allowed = torch.ones(V, dtype=torch.bool)
        if p.top_k > 0:
            allowed &= x >= x.sort(descending=True).values[p.top_k - 1]
            prob = torch.where(allowed, prob, 0)
            prob /= prob.sum()
        if p.top_p < 1:
            sp = prob.sort(descending=True).values
            before = sp.cumsum(0) - sp
            # ties at the boundary may go either way: allow every token tied with the last kept one
            last = sp[(before < p.top_p).nonzero().max()]
            allowed &= prob >= last * (1 - 1e-6)
            prob = torch.where(allowed, prob, 0)
            prob /= prob.sum()
        if p.min_p > 0:
            allowed &= prob >= p.min_p * prob.max() * (1 - 1e-6)
        assert allowed[drawn[:, i]].all(), (i, p)


PATHS = {
    "ladder": dict(CANDIDATES=3, TOP_P_CANDIDATES=(6,)),
    # coarse histogram: many tokens (and the catch-all tail) per bucket, sorted within the nucleus' last bucket
    "histogram": dict(CANDIDATES=3, TOP_P_CANDIDATES=(), HIST_BUCKETS=8, HIST_RANGE=6.0),
    "no workspace": dict(CANDIDATES=3, TOP_P_CANDIDATES=(6,), MAX_ELEMENTS=0),  # plain allocations throughout
}


@pytest.mark.parametrize("config", list(PATHS))
@pytest.mark.parametrize("name", ["top_k=12,T=0.8", "top_p=0.6", "top_p=0.93,T=1.5", "min_p=0.1", "top_k+top_p",
                                  "top_p+min_p", "top_k+top_p+min_p"])
def test_distribution_through_every_path(name, config, monkeypatch):
    """With a tiny partial top-k, rows go through every path (exact from the candidates, retried with more
    candidates, the histogram search for the nucleus, the full-vocabulary draw); peaked and flat logits in one
    batch make each path happen. Each row still matches its reference."""
    import tokenloom.sample.ops as sampler_mod

    for attr, value in PATHS[config].items():
        monkeypatch.setattr(sampler_mod.Workspace if attr == "MAX_ELEMENTS" else sampler_mod, attr, value)
    paths = {"candidates": 0, "full": 0}
    def spy(fn, key):
        def wrapped(*a):
            paths[key] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(sampler_mod, "_draw_candidates", spy(sampler_mod._draw_candidates, "candidates"))
    monkeypatch.setattr(sampler_mod._FullRows, "draw", spy(sampler_mod._FullRows.draw, "full"))
    kw = SETTINGS[name]
    scales = [0.4, 1.0, 2.0, 4.0, 8.0]
    rows_logits = [_logits(seed=4 + j, scale=sc) for j, sc in enumerate(scales)]
    per = 5000
    params = SamplingParams(**kw)
    rows = [SamplingRow(params, [], [], None)] * (per * len(scales))
    out = Sampler(torch.Generator().manual_seed(7))(torch.stack(rows_logits * per), rows)
    tokens = np.asarray(out.token_ids).reshape(per, len(scales))
    for j, x in enumerate(rows_logits):
        counts = np.bincount(tokens[:, j], minlength=32)
        assert chi2_pvalue(counts, reference_probs(x.numpy(), **kw)) > P_MIN, (name, scales[j])
    assert paths["candidates"] > 0
    if params.top_k <= 0:
        assert paths["full"] > 0


TARGETS = {"top_p+min_p": SamplingParams(temperature=0.9, top_p=0.8, min_p=0.01, seed=5),
           "top_k+top_p": SamplingParams(temperature=0.9, top_k=400, top_p=0.8, seed=5)}


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_seeded_row_ignores_the_rest_of_the_batch(target, bf16, monkeypatch):
    """The same seeded row, step after step (peaked and flat logits), alone / beside rows that change how many
    candidates the batch looks at / in another order / forced through the full-vocabulary path: the same
    tokens every time."""
    import tokenloom.sample.ops as sampler_mod

    V, steps = 3000, 60
    g = torch.Generator().manual_seed(0)
    scales = (torch.rand(steps, generator=g) * 5.5 + 0.5).tolist()
    stream = [torch.randn(V, generator=g) * sc for sc in scales]
    if bf16:  # bf16 logits: many exact ties, at the top-k and top-p boundaries too
        stream = [x.bfloat16().float() for x in stream]
    params = TARGETS[target]
    others = [SamplingParams(temperature=1.0, top_k=2000), SamplingParams(temperature=0.7),
              SamplingParams(temperature=0), SamplingParams(temperature=1.1, top_p=0.5, seed=9)]

    def run(layout: str) -> list[int]:
        gen = torch.Generator().manual_seed(5)
        sampler = Sampler(torch.Generator().manual_seed(1))
        out = []
        for x in stream:
            row = SamplingRow(params, [], [], gen)
            if layout == "alone":
                out.append(sampler(x[None].clone(), [row]).token_ids[0])
                continue
            extra = [SamplingRow(p, [], [], torch.Generator().manual_seed(3) if p.seed else None) for p in others]
            batch = [torch.roll(x, 7 * (j + 1)) for j in range(len(extra))]
            rows, logits = ([row] + extra, [x] + batch) if layout == "first" else (extra + [row], batch + [x])
            tokens = sampler(torch.stack(logits), rows).token_ids
            out.append(tokens[0] if layout == "first" else tokens[-1])
        return out

    alone = run("alone")
    assert len(set(alone)) > 15  # really sampling
    assert run("first") == alone
    assert run("last") == alone
    monkeypatch.setattr(sampler_mod, "CANDIDATES", 1)
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", ())
    assert run("alone") == alone


# ---- penalties ---------------------------------------------------------------------------------------------
def _openai_penalties(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence,
    with c[j] how often token j was sampled before (the generated tokens only)."""
    out = logits.clone()
    for j in range(logits.shape[0]):
        c = output.count(j)
        out[j] = logits[j] - c * frequency - float(c > 0) * presence
    return out


def _hf_repetition(logits: torch.Tensor, prompt: list[int], output: list[int], penalty: float) -> torch.Tensor:
    from transformers import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(penalty)
    return proc(torch.tensor([prompt + output]), logits[None].clone())[0]


PENALTY_CASES = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),  # < 1 favours repeats
    dict(presence_penalty=0.8),
    dict(frequency_penalty=0.6),
    dict(presence_penalty=-0.5, frequency_penalty=1.5),
    dict(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3),
    dict(),
]


def test_penalties_match_reference_formulas():
    V = 16
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    logits, rows, refs = [], [], []
    for case in PENALTY_CASES:
        row = torch.randn(V, generator=g) * 3  # positive and negative logits
        prompt = [rng.randrange(V) for _ in range(5)]
        output = [rng.randrange(V) for _ in range(9)]  # with repeats, so counts > 1 occur
        p = SamplingParams(temperature=0, logprobs=V, **case)
        ref = _hf_repetition(row, prompt, output, p.repetition_penalty)
        ref = _openai_penalties(ref, output, p.presence_penalty, p.frequency_penalty)
        logits.append(row)
        rows.append(SamplingRow(p, prompt, output, None))
        refs.append(ref)
    logits = torch.stack(logits)
    adjusted = apply_penalties(logits.clone(), rows)
    for i, case in enumerate(PENALTY_CASES):
        assert torch.allclose(adjusted[i], refs[i], atol=1e-5), case
    # Through the whole sampler: the logprobs are log_softmax of the penalised logits; greedy = their argmax.
    out = Sampler(torch.Generator().manual_seed(0))(logits.clone(), rows)
    for i, case in enumerate(PENALTY_CASES):
        ref_lp = torch.log_softmax(refs[i], -1)
        assert out.token_ids[i] == int(refs[i].argmax()), case
        got = dict(out.logprobs[i][1:])
        assert sorted(got) == list(range(V))
        assert all(abs(got[t] - float(ref_lp[t])) < 1e-5 for t in range(V)), case


def test_presence_and_frequency_ignore_the_prompt_and_logit_bias_and_min_tokens():
    V = 12
    logits = torch.zeros(1, V)
    eos = (2,)
    # Prompt tokens carry no presence/frequency penalty (OpenAI counts sampled tokens).
    rows = [SamplingRow(SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), [5, 5, 5], [7, 7], None)]
    adj = apply_penalties(logits.clone(), rows)[0]
    assert adj[5] == 0 and adj[7] == pytest.approx(-3.0)
    # logit_bias is added to the logits; min_tokens bans EOS and stop_token_ids until enough tokens exist.
    s = Sampler(torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0, logit_bias={2: 5.0, 9: 3.0}, min_tokens=2, stop_token_ids=[9], logprobs=3)
    out = s(logits.clone(), [SamplingRow(p, [1], [4], None, eos)])
    assert out.token_ids == [0]  # 2 and 9 are banned; the rest tie at 0 and argmax takes the first
    assert out.logprobs[0][0] == (0, pytest.approx(-np.log(V - 2)))
    out = s(logits.clone(), [SamplingRow(p, [1], [4, 4], None, eos)])  # min_tokens reached
    assert out.token_ids == [2]
    lp = dict(out.logprobs[0][1:])
    assert lp[2] == pytest.approx(5 - np.log(np.exp(5) + np.exp(3) + V - 2), abs=1e-5)


def test_reported_logprobs_are_always_json_numbers():
    """A repetition penalty that is 0 in float32 (5e-324, valid by the schema) overflows the logits it divides, and
    banned tokens have logprob -inf: neither may reach a response as inf/NaN (JSON has neither). Impossible tokens
    read -9999.0, as in vLLM; the penalised token still wins, as the penalty says it should."""
    import json

    V = 8
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0, 1.0, -3.0, 0.25, 0.75]])
    s = Sampler(torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0, repetition_penalty=5e-324, logprobs=V, min_tokens=3, stop_token_ids=[6])
    out = s(logits.clone(), [SamplingRow(p, [0, 1, 2], [], None, (7,))])
    json.dumps(out.logprobs, allow_nan=False)
    assert out.token_ids[0] in (0, 1)  # the seen positive logits, divided by ~0, dominate (and tie in float32)
    lp = dict(out.logprobs[0][1:])
    assert lp[6] == lp[7] == -9999.0  # banned by min_tokens
    assert -1 < lp[0] <= 0 and -1 < lp[1] <= 0 and lp[2] == lp[3] == lp[4] == -9999.0


# ---- logits processors, the grammar bitmask, the final distributions ------------------------------------------
def _pack(allowed: np.ndarray) -> torch.Tensor:
    """A dense boolean mask [rows, V] packed as structured output does: int32 words, bit b of word w = token
    32 * w + b (least significant bit first), bit set = allowed."""
    rows, V = allowed.shape
    words = -(-V // 32)
    padded = np.zeros((rows, words * 32), dtype=np.uint64)
    padded[:, :V] = allowed
    packed = (padded.reshape(rows, words, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    return torch.from_numpy(packed.astype(np.uint32).view(np.int32))


def test_token_bitmask_matches_a_dense_mask():
    from tokenloom.sample import apply_token_bitmask

    rng = np.random.default_rng(0)
    for V in (100, 128, 31):  # a partial last word, whole words, a single word
        allowed = rng.random((6, V)) < 0.4
        allowed[:, 31 % V] = True  # bit 31: the int32 sign bit
        allowed[0] = True
        bitmask = _pack(allowed)
        assert bitmask.dtype == torch.int32 and bitmask.shape == (6, -(-V // 32))
        logits = torch.randn(6, V, generator=torch.Generator().manual_seed(V))
        want = torch.where(torch.from_numpy(allowed), logits, float("-inf"))
        got = logits.clone()
        apply_token_bitmask(got, bitmask)
        assert torch.equal(got, want)
        # rows: the bitmask's rows apply to those logits rows only
        got = logits.clone()
        apply_token_bitmask(got, bitmask[[1, 4]], torch.tensor([2, 5]))
        assert torch.equal(got[[2, 5]], torch.where(torch.from_numpy(allowed[[1, 4]]), logits[[2, 5]], float("-inf")))
        assert torch.equal(got[[0, 1, 3, 4]], logits[[0, 1, 3, 4]])
    # a padded vocabulary (logits wider than the bitmask covers): the extra columns are left alone
    logits = torch.randn(2, 70)
    got = logits.clone()
    apply_token_bitmask(got, _pack(np.zeros((2, 40), dtype=bool)))
    assert torch.isneginf(got[:, :64]).all() and torch.equal(got[:, 64:], logits[:, 64:])


def test_grammar_bitmask_and_request_processors_through_the_sampler():
    V = 40
    logits = _logits(V, seed=2).expand(4, -1).clone()
    before = logits.clone()
    allowed = np.zeros((4, V), dtype=bool)
    allowed[:, [5, 9, 17, 33, 38]] = True
    calls = []

    def ban_nine(output_ids, row):  # a per-request processor
        calls.append(list(output_ids))
        row[9] = float("-inf")
        return row

    rows = [SamplingRow(SamplingParams(temperature=0), [], [], None),
            SamplingRow(SamplingParams(temperature=1.0), [], [1, 2], None, logits_processors=(ban_nine,)),
            SamplingRow(SamplingParams(temperature=1.3, top_p=0.9), [], [], None),
            SamplingRow(SamplingParams(temperature=0), [], [], None, logits_processors=(ban_nine,))]
    meta = SamplingMetadata.from_rows(rows * 500, "cpu", token_bitmask=_pack(np.tile(allowed, (500, 1))))
    out = _Sampler(torch.Generator().manual_seed(0))(logits.repeat(500, 1), meta, return_probs=True)
    tokens = np.asarray(out.token_ids).reshape(500, 4)
    best = [t for t in before[0].argsort(descending=True).tolist() if allowed[0, t]]
    assert (tokens[:, 0] == best[0]).all() and (tokens[:, 3] == [t for t in best if t != 9][0]).all()
    assert np.isin(tokens, np.flatnonzero(allowed[0])).all()
    assert (tokens[:, 1] != 9).all()
    assert calls[0] == [1, 2] and len(calls) == 1000
    forbidden = ~torch.from_numpy(np.tile(allowed, (500, 1)))
    assert (out.probs[forbidden] == 0).all() and (out.probs[1::4, 9] == 0).all()
    # the sampled rows draw from exactly the masked distribution
    ref = _softmax(np.where(allowed[0] & (np.arange(V) != 9), before[0].numpy().astype(np.float64), -np.inf))
    assert chi2_pvalue(np.bincount(tokens[:, 1], minlength=V), ref) > P_MIN
    assert torch.equal(logits, before)


PROBS_CASES = {**SETTINGS, "penalties+bias": dict(temperature=0.9, top_p=0.8, repetition_penalty=1.3,
                                                  presence_penalty=0.5, logit_bias={4: 1.5})}


@pytest.mark.parametrize("config", ["default", "histogram"])
def test_probs_are_the_distribution_drawn_from(config, monkeypatch):
    """return_probs: each row's final distribution (after processors, temperature and truncation; one-hot for
    greedy rows), [rows, V] float32: rows sum to 1, are zero outside the truncation set, equal the reference, and
    the tokens drawn follow them; asking for them changes no token."""
    import tokenloom.sample.ops as ops_mod

    if config != "default":  # tiny candidate sets: the full-vocabulary paths report their thresholds too
        for attr, value in PATHS[config].items():
            monkeypatch.setattr(ops_mod, attr, value)
    names = list(PROBS_CASES)
    logits = torch.stack([_logits(seed=20 + i, scale=1.0 + (i % 4)) for i in range(len(names))] + [_logits(seed=1)])
    rows = [SamplingRow(SamplingParams(**PROBS_CASES[n]), [4, 6], [6, 7, 6], None) for n in names]
    rows.append(SamplingRow(SamplingParams(temperature=0, logprobs=1), [], [], None))
    out = Sampler(torch.Generator().manual_seed(3))(logits.clone(), rows, return_probs=True)
    same = Sampler(torch.Generator().manual_seed(3))(logits.clone(), rows)
    assert out.token_ids == same.token_ids and out.logprobs == same.logprobs and same.probs is None
    probs = out.probs
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-6)
    for i, n in enumerate(names):
        x = logits[i]
        if n == "penalties+bias":  # logit_bias, then the penalties (their formulas are checked below)
            x = x.clone()
            x[4] += 1.5
            x = apply_penalties(x[None], [rows[i]])[0]
        kw = {k: v for k, v in PROBS_CASES[n].items() if k in ("temperature", "top_k", "top_p", "min_p")}
        ref = reference_probs(x.numpy(), **kw)
        assert ((probs[i] > 0).numpy() == (ref > 0)).all(), n
        assert np.allclose(probs[i].double().numpy(), ref, atol=1e-6), n
    assert probs[-1].tolist() == [float(t == out.token_ids[-1]) for t in range(32)]
    # the draws follow probs: many copies of one row in one call
    for i in (names.index("top_k+top_p+min_p"), names.index("penalties+bias")):
        n = 8000
        rep = Sampler(torch.Generator().manual_seed(i))(logits[i].expand(n, -1).clone(), [rows[i]] * n,
                                                         return_probs=True)
        p = rep.probs[0].double().numpy()
        assert torch.equal(rep.probs, rep.probs[:1].expand(n, -1))
        assert chi2_pvalue(np.bincount(rep.token_ids, minlength=32), p / p.sum()) > P_MIN


def test_sample_modules_put_every_tensor_on_the_logits_device():
    """Tensors made from nothing (torch.tensor, empty, zeros, ...) in tokenloom/sample/ name their device: none is
    left on the CPU by default while the logits are elsewhere."""
    import ast
    from pathlib import Path

    import tokenloom.sample

    makers = {"tensor", "empty", "zeros", "ones", "full", "arange", "rand", "randn", "as_tensor"}
    offenders = []
    for path in Path(tokenloom.sample.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in makers
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


# ---- the engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_llama):
    path, ref = tiny_llama
    return path, ref, LLM(str(path), dtype="float32", block_size=16, seed=0)


def _prompt(n: int, seed: int = 0, vocab: int = 320) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


@torch.inference_mode()
def _hf_logprobs(ref, tokens: list[int]) -> torch.Tensor:
    return torch.log_softmax(ref(torch.tensor([tokens])).logits[0].float(), -1)


@pytest.mark.parametrize("chunk", [2048, 5])
def test_logprobs_match_transformers(tiny, chunk):
    path, ref, llm = tiny
    if chunk != 2048:  # chunked prefill: prompt logprobs arrive over several steps
        llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=chunk)
    prompt = _prompt(19, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=4, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=6, logprobs=0, ignore_eos=True)]
    outs = llm.generate([prompt, prompt], params)
    for out, p in zip(outs, params):
        comp = out.outputs[0]
        ref_lp = _hf_logprobs(ref, prompt + comp.token_ids)
        assert len(comp.logprobs) == len(comp.token_ids) == 6
        for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            row = ref_lp[len(prompt) - 1 + i]
            assert next(iter(entry)) == tok  # the chosen token comes first
            assert entry[tok] == pytest.approx(float(row[tok]), abs=1e-4)
            top = row.topk(p.logprobs)
            assert len(entry) == p.logprobs + (tok not in top.indices.tolist())
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[t] == pytest.approx(v, abs=1e-4)
    ref_lp = _hf_logprobs(ref, prompt)
    plp = outs[0].prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        entry, row = plp[pos], ref_lp[pos - 1]
        assert entry[prompt[pos]] == pytest.approx(float(row[prompt[pos]]), abs=1e-4)
        for v, t in zip(*row.topk(4)):
            assert entry[int(t)] == pytest.approx(float(v), abs=1e-4)
    assert outs[1].prompt_logprobs is None
    assert llm.engine.stats().num_blocks_used == 0


def _mixed_batch(n: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    kinds = [dict(temperature=0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=20),
             dict(temperature=0.7, min_p=0.05), dict(temperature=1.1, repetition_penalty=1.2, seed=rng.randrange(99)),
             dict(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3), dict(temperature=1.0, logprobs=2),
             dict(temperature=1.0, n=2, seed=5)]
    return [(_prompt(rng.randint(4, 40), seed=rng.randrange(10**6)),
             SamplingParams(max_tokens=rng.randint(4, 20), ignore_eos=True, **kinds[i % len(kinds)]))
            for i in range(n)]


def test_seeded_request_reproducible_in_any_batch(tiny):
    path, _, _ = tiny
    target = (_prompt(23, seed=7), SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=16,
                                                 ignore_eos=True))

    def run(batch):
        llm = LLM(str(path), dtype="float32", block_size=8, max_num_batched_tokens=64)  # chunked prefills too
        outs = llm.generate([p for p, _ in batch], [s for _, s in batch])
        i = next(k for k, (p, s) in enumerate(batch) if s is target[1])
        return outs[i].outputs[0].token_ids

    alone = run([target])
    others = _mixed_batch(15, seed=3)
    batch = others[:6] + [target] + others[6:]
    assert run(batch) == alone
    assert run(list(reversed(batch))) == alone
    # Unseeded requests draw from the engine's generator: the engine seed decides them.
    twin = (target[0], SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=16, ignore_eos=True))
    unseeded = [LLM(str(path), dtype="float32", seed=seed).generate(*twin)[0].outputs[0].token_ids
                for seed in (0, 0, 1)]
    assert unseeded[0] == unseeded[1] != unseeded[2]


def test_n_completions_share_the_prompt_blocks(tiny):
    path, _, _ = tiny
    llm = LLM(str(path), dtype="float32", block_size=16)
    eng = llm.engine
    prompt = _prompt(56, seed=4)  # 3 full blocks and a partial one
    prompt_blocks = -(-len(prompt) // 16)
    seed = 42
    eng.add_request(prompt, SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True))
    eng.step()  # prefill: every completion draws its first token from the shared last row
    st = eng.stats()
    assert st.num_blocks_used == prompt_blocks
    assert st.num_running == 4
    eng.step()  # first decode: a private copy of the shared partial block per writer, at most
    assert prompt_blocks < eng.stats().num_blocks_used <= prompt_blocks + 4
    final = None
    while eng.has_unfinished():
        for out in eng.step():
            final = out
    assert final.finished and len(final.outputs) == 4
    assert [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in final.outputs)
    assert len({tuple(o.token_ids) for o in final.outputs}) == 4
    assert eng.stats().num_blocks_used == 0
    # Completion i draws from seed + i: each equals a lone n=1 request with that seed, so sharing the prompt's
    # KV blocks (and copying on write) changed nothing.
    for o in final.outputs:
        alone = llm.generate(prompt, SamplingParams(temperature=1.0, seed=seed + o.index, max_tokens=12,
                                                    ignore_eos=True))[0]
        assert alone.outputs[0].token_ids == o.token_ids


BAD = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(logit_bias={5: 200.0}), "logit_bias"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(seed=1.5), "seed"),
    (dict(temperature="hot"), "temperature"),
    (dict(stop=[3]), "stop"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
]


@pytest.mark.parametrize("kw,param", BAD, ids=[p + str(i) for i, (_, p) in enumerate(BAD)])
def test_invalid_params_are_clear_errors(kw, param):
    with pytest.raises(SamplingParamsError, match=param) as e:
        SamplingParams(**kw)
    assert e.value.param == param
    assert isinstance(e.value, TokenloomError) and isinstance(e.value, ValueError)


def test_invalid_requests_rejected_before_scheduling(tiny):
    _, _, llm = tiny
    eng = llm.engine
    good = SamplingParams(max_tokens=4)
    for bad, param in [(dict(logit_bias={320: 1.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
                       (dict(stop_token_ids=[10**6]), "stop_token_ids")]:
        with pytest.raises(SamplingParamsError, match="not in the vocabulary") as e:
            llm.generate([[5, 6, 7], [8, 9]], [good, SamplingParams(max_tokens=4, **bad)])
        assert e.value.param == param
        assert not eng.has_unfinished() and eng.stats().num_blocks_used == 0 and not eng.output_processor.groups
    with pytest.raises(SamplingParamsError):
        llm.generate([5, 6], SamplingParams(temperature=-1))
    assert not eng.has_unfinished() and eng.stats().num_blocks_used == 0


# ---- stop handling on the real model (greedy) ------------------------------------------------------------------
PROMPT = "Once upon a time, there was a little robot who"
FREE = 24  # tokens of the free greedy run


@pytest.fixture(scope="module")
def free_run(default_llm):
    """The greedy continuation without stops, and the text each token adds."""
    out = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=FREE, ignore_eos=True))[0].outputs[0]
    tok = default_llm.tokenizer
    ends, text = [], ""
    for i in range(1, len(out.token_ids) + 1):
        text = tok.decode(out.token_ids[:i], skip_special_tokens=True)
        ends.append(len(text))
    assert text == out.text and len(out.token_ids) == FREE and out.finish_reason == "length"
    return out, ends


def _spanning(text: str, ends: list[int], k: int, length: int = 4) -> str:
    """A substring of text that starts inside token k and ends inside token k + 1 (after the boundary), and
    occurs nowhere earlier in the text."""
    boundary = ends[k]
    for start in range(boundary - 1, max(boundary - length, 0) - 1, -1):
        s = text[start : start + length]
        if start < boundary < start + len(s) and text.find(s) == start and len(s) == length:
            return s
    raise AssertionError(f"no spanning substring at token {k}")


def test_stop_strings(default_llm, free_run):
    free, ends = free_run
    text = free.text
    cases: list[tuple[SamplingParams, dict]] = []

    def case(expect_text, reason, stop_reason, n_tokens=None, **kw):
        kw.setdefault("max_tokens", FREE)
        cases.append((SamplingParams(temperature=0, ignore_eos=True, **kw),
                      dict(text=expect_text, finish_reason=reason, stop_reason=stop_reason, n_tokens=n_tokens)))

    for k in (3, 9, 17):  # stop strings across token boundaries
        s = _spanning(text, ends, k)
        idx = text.find(s)
        case(text[:idx], "stop", s, n_tokens=k + 2, stop=[s])
        case(text[: idx + len(s)], "stop", s, n_tokens=k + 2, stop=s, include_stop_str_in_output=True)
    # several stop strings: the earliest in the text wins, whatever the list order
    s1, s2 = _spanning(text, ends, 12), _spanning(text, ends, 5)
    case(text[: text.find(s2)], "stop", s2, stop=[s1, "never appears ~~", s2])
    if "\n\n" in text:  # a stop string made of two whole one-character tokens
        case(text[: text.find("\n\n")], "stop", "\n\n", stop=["\n\n"])
    case(text, "length", None, n_tokens=FREE, stop=[])  # empty stop list
    case(text, "length", None, n_tokens=FREE, stop=["never appears ~~"])
    # stop on the first token: a string inside the first token's text, and one spanning tokens 0 and 1
    first = text[: ends[0]]
    inner = first.strip()[:2]
    assert len(inner) == 2, first
    case(text[: text.find(inner)], "stop", inner, n_tokens=1, stop=inner)
    s0 = _spanning(text, ends, 0, length=2)
    case(text[: text.find(s0)], "stop", s0, n_tokens=2, stop=[s0])
    case(first, "length", None, n_tokens=1, max_tokens=1)  # max_tokens=1
    case(text[: ends[4]], "length", None, n_tokens=5, max_tokens=5, stop=[_spanning(text, ends, 20)])
    # a stop token id: the output ends with that token (whether its text is kept is not specified here)
    case((text[: ends[5]], text[: ends[6]]), "stop", free.token_ids[6], n_tokens=7,
         stop_token_ids=[free.token_ids[6]])

    outs = default_llm.generate([PROMPT] * len(cases), [p for p, _ in cases])
    for (p, want), out in zip(cases, outs):
        o = out.outputs[0]
        got = dict(text=o.text, finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                   n_tokens=len(o.token_ids) if want["n_tokens"] is not None else None)
        if isinstance(want["text"], tuple) and o.text in want["text"]:
            got["text"] = want["text"]
        assert got == want, (p.stop, p.max_tokens)
        assert o.token_ids == free.token_ids[: len(o.token_ids)]
    assert default_llm.engine.stats().num_blocks_used == 0


def test_seeded_text_reproducible_on_the_real_model(default_llm):
    """Seeded text is identical alone, in a batch of 16 mixed requests, and in another arrival order."""
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=2024, max_tokens=10)
    prompt = "Once upon a time"
    alone = default_llm.generate(prompt, target)[0].outputs[0].text
    rng = random.Random(0)
    words = ["the", "a", "robot", "paints", "blue", "sky", "river", "song", "city", "night"]
    others = [(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))),
               SamplingParams(max_tokens=rng.randint(2, 8), **kind))
              for kind in [dict(temperature=0), dict(temperature=1.0, top_k=30), dict(temperature=0.7, min_p=0.1),
                           dict(temperature=1.0, repetition_penalty=1.3), dict(temperature=1.2, seed=1)] * 3]
    batch = others[:7] + [(prompt, target)] + others[7:]
    for order in (batch, batch[::-1]):
        outs = default_llm.generate([p for p, _ in order], [s for _, s in order])
        i = next(k for k, (_, s) in enumerate(order) if s is target)
        assert outs[i].outputs[0].text == alone
