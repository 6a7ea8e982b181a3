"""Sampling under a structured-output grammar bitmask (SamplingMetadata.token_bitmask / bitmask_rows).

A masked row must draw from the softmax restricted to the allowed tokens, with temperature and truncation
(top-k, top-p, min-p) applied to that restricted distribution, never a forbidden token; greedy rows take the
argmax among the allowed tokens; the mask reaches only the rows bitmask_rows names. Distributions are checked with
chi-square tests against a reference computed here (numpy, float64), bitmasks are packed here too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tokenloom.sample import Sampler, SamplingMetadata, SamplingRow
from tokenloom.sample.logits_processors import apply_token_bitmask
from tokenloom.sampling_params import SamplingParams

V = 100
DRAWS = 20_000
P_MIN = 1e-4  # a correct sampler fails a check with probability 1e-4 (the seeds are fixed: deterministic)


def pack(allowed: np.ndarray) -> torch.Tensor:
    """[n, V] bool -> the packed int32 [n, ceil(V / 32)] mask: bit b of word w allows token 32 w + b."""
    allowed = np.atleast_2d(allowed)
    n, v = allowed.shape
    bits = np.zeros((n, -(-v // 32) * 32), dtype=np.uint64)
    bits[:, :v] = allowed
    words = (bits.reshape(n, -1, 32) << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


def random_case(seed: int, frac: float = 0.4):
    """Logits over V tokens and a random mask allowing about frac of them, the global argmax forbidden."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, V).astype(np.float32)
    allowed = rng.random(V) < frac
    allowed[np.argmax(logits)] = False
    return torch.from_numpy(logits), allowed


def reference_probs(logits, allowed, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, mask_last=False):
    """The mask first, then temperature, top-k, top-p and min-p on what it allows, each renormalising.
    mask_last: the wrong order (truncate the whole distribution, then mask), for the negative control."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    if not mask_last:
        x = np.where(allowed, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_k > 0:
        p = np.where(x >= np.sort(x)[::-1][top_k - 1], p, 0.0)
        p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        assert np.abs(cum - top_p).min() > 1e-4, "pick a top_p away from a cumulative boundary"
        keep = np.zeros(len(p), dtype=bool)
        keep[order[cum - p[order] < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    if mask_last:
        p = np.where(allowed, p, 0.0)
        p /= p.sum()
    return p


def chi2_pvalue(counts, probs) -> float:
    """p-value of the counts under probs; 0.0 when a token of probability 0 was drawn. Bins expected to hold
    fewer than 5 draws are pooled."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    support = probs > 0
    obs, exp = counts[support], probs[support] * counts.sum()
    if len(obs) == 1:
        return 1.0
    small = exp < 5
    if small.sum() > 0:
        obs, exp = np.append(obs[~small], obs[small].sum()), np.append(exp[~small], exp[small].sum())
    return float(chisquare(obs, exp).pvalue)


def draw(logits, bitmask, params, n=DRAWS, seed=0, bitmask_rows=None, seeded=False):
    """n draws through the Sampler: the logits row repeated n times, the bitmask row(s) repeated to match."""
    gen = torch.Generator().manual_seed(seed + 100) if seeded else None
    rows = [SamplingRow(params, [], [], gen)] * n
    if bitmask is not None:
        reps = n // bitmask.shape[0] if bitmask_rows is None else len(bitmask_rows) // bitmask.shape[0]
        bitmask = bitmask.repeat(reps, 1)
    batch = logits.expand(n, -1).clone()
    before = batch.clone()
    meta = SamplingMetadata.from_rows(rows, "cpu", token_bitmask=bitmask, bitmask_rows=bitmask_rows)
    tokens = np.asarray(Sampler(torch.Generator().manual_seed(seed))(batch, meta).token_ids)
    assert torch.equal(batch, before), "the caller's logits were changed"
    return tokens


SETTINGS = {
    "T=1": dict(temperature=1.0),
    "T=0.6": dict(temperature=0.6),
    "T=1.8": dict(temperature=1.8),
    "top_k=5": dict(temperature=1.0, top_k=5),
    "top_k=80 (more than allowed)": dict(temperature=1.0, top_k=80),
    "top_p=0.7": dict(temperature=1.0, top_p=0.7),
    "top_k+top_p,T=1.3": dict(temperature=1.3, top_k=12, top_p=0.83),
    "min_p=0.05": dict(temperature=1.0, min_p=0.05),
}


@pytest.mark.parametrize("seeded", [False, True], ids=["engine-generator", "seeded"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_masked_distribution_matches_reference(name, seeded):
    seed = list(SETTINGS).index(name)
    logits, allowed = random_case(seed)
    counts = np.bincount(draw(logits, pack(allowed), SamplingParams(**SETTINGS[name]), seed=seed, seeded=seeded),
                         minlength=V)
    assert counts[~allowed].sum() == 0, f"{name}: drew forbidden tokens {np.flatnonzero(counts * ~allowed)}"
    probs = reference_probs(logits.numpy(), allowed, **SETTINGS[name])
    assert chi2_pvalue(counts, probs) > P_MIN, name


def test_negative_controls_reject_wrong_distributions():
    """The check has power: the same draws reject the unmasked distribution, truncation before the mask, and a
    slightly wrong temperature."""
    logits, allowed = random_case(3)
    for kw, wrong in [(dict(temperature=1.0, top_k=5), dict(mask_last=True)),
                      (dict(temperature=1.0, top_p=0.7), dict(mask_last=True)),
                      (dict(temperature=1.0), dict(temperature=1.15))]:
        counts = np.bincount(draw(logits, pack(allowed), SamplingParams(**kw), seed=5), minlength=V)
        assert chi2_pvalue(counts, reference_probs(logits.numpy(), allowed, **kw)) > P_MIN, kw
        assert chi2_pvalue(counts, reference_probs(logits.numpy(), allowed, **{**kw, **wrong})) < P_MIN, (kw, wrong)
    counts = np.bincount(draw(logits, None, SamplingParams(temperature=1.0), seed=5), minlength=V)
    assert counts[~allowed].sum() > 0  # without the mask the forbidden tokens are drawn


def test_greedy_takes_the_argmax_among_allowed_tokens():
    cases = [random_case(10 + i, frac=f) for i, f in enumerate([0.05, 0.3, 0.9])]
    logits = torch.stack([c[0] for c in cases])
    bitmask = torch.cat([pack(c[1]) for c in cases])
    rows = [SamplingRow(SamplingParams(temperature=0), [], [], None)] * 3
    out = Sampler(torch.Generator().manual_seed(0))(logits, SamplingMetadata.from_rows(rows, "cpu", bitmask))
    expected = [int(np.argmax(np.where(a, lg.numpy(), -np.inf))) for lg, a in cases]
    assert out.token_ids == expected
    assert all(e != int(lg.argmax()) for e, (lg, _) in zip(expected, cases))  # the mask did change the answer


def test_a_single_allowed_token_is_always_drawn():
    logits, _ = random_case(4)
    only = np.zeros(V, dtype=bool)
    only[int(logits.argmin())] = True  # the least likely token
    for kw in [dict(temperature=1.0), dict(temperature=0.5, top_p=0.1), dict(temperature=1.0, top_k=1, min_p=0.9)]:
        assert (draw(logits, pack(only), SamplingParams(**kw), n=500) == int(logits.argmin())).all(), kw


def test_all_bits_set_changes_nothing():
    """A mask allowing every token leaves the draws exactly as they are without one (same seeds)."""
    logits, _ = random_case(5)
    params = SamplingParams(temperature=0.9, top_p=0.9)
    full = torch.full((1, -(-V // 32)), -1, dtype=torch.int32)
    assert (draw(logits, full, params, n=2000) == draw(logits, None, params, n=2000)).all()


def test_bitmask_rows_reach_only_the_listed_rows():
    # greedy: rows 1 and 3 masked (each by its own mask row), rows 0, 2 and 4 not
    logits, a = random_case(6)
    b = np.roll(a, 7) & (np.arange(V) != int(logits.argmax()))
    rows = [SamplingRow(SamplingParams(temperature=0), [], [], None)] * 5
    meta = SamplingMetadata.from_rows(rows, "cpu", token_bitmask=pack(np.stack([a, b])), bitmask_rows=[1, 3])
    out = Sampler(torch.Generator().manual_seed(0))(logits.expand(5, -1).clone(), meta).token_ids
    top = int(logits.argmax())
    best = [int(np.argmax(np.where(m, logits.numpy(), -np.inf))) for m in (a, b)]
    assert best[0] != best[1] and out == [top, best[0], top, best[1], top]
    # sampled: the even rows of a batch masked, the odd rows drawing from the whole distribution
    n = DRAWS
    tokens = draw(logits, pack(a), SamplingParams(temperature=1.0), n=n, seed=8, bitmask_rows=list(range(0, n, 2)))
    masked, free = np.bincount(tokens[0::2], minlength=V), np.bincount(tokens[1::2], minlength=V)
    assert chi2_pvalue(masked, reference_probs(logits.numpy(), a)) > P_MIN
    assert chi2_pvalue(free, reference_probs(logits.numpy(), np.ones(V, dtype=bool))) > P_MIN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # the CPU kernel, torch ops
@pytest.mark.parametrize("rows", [None, [2, 0]])
def test_apply_token_bitmask_exactly(rows, dtype):
    """-inf exactly at the forbidden tokens of the listed rows; tokens past 32 x the mask's width (a padded
    vocabulary) and the unlisted rows untouched."""
    rng = np.random.default_rng(0)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).to(dtype)
    allowed = rng.random((3 if rows is None else 2, 96)) < 0.5  # 3 words: tokens 96..99 are past the mask
    out = logits.clone()
    apply_token_bitmask(out, pack(allowed), None if rows is None else torch.tensor(rows))
    expected = logits.clone()
    for k, r in enumerate(range(3) if rows is None else rows):
        expected[r, :96][torch.from_numpy(~allowed[k])] = float("-inf")
    assert torch.equal(out, expected)
