"""Speculative decoding's rejection sampler (tokenloom/sample/rejection_sampler.py).

Its promise: the kept tokens follow the target distribution exactly, whatever the drafts. Checked with chi-square
tests on a toy first-order Markov target P and a different Markov draft Q over 6 tokens, each with zeros where the
other has mass: 4-token sequences are generated speculatively (3 drafts from Q per call, each call continuing from
the tokens kept so far), and the token pairs (1, 2) and (3, 4) and token 4 are compared with the exact Markov
probabilities (matrix products, numpy float64); the number of drafts a call accepts with its exact law too.
Negative controls patch the module's seams with realistic bugs and must fail the same checks. Deterministic tests
cover greedy targets, one-hot drafts (draft_probs None), k = 0 and the residual itself.
"""
from __future__ import annotations

import bisect
import math
import random

import numpy as np
import pytest
import torch

import tokenloom.sample.rejection_sampler as rs
from tokenloom.sample.rejection_sampler import rejection_sample, residual_distribution

try:
    from scipy.stats import chisquare
except ImportError:  # scipy is a test extra; the same p-value from torch's regularised upper incomplete gamma
    chisquare = None

V, K, N = 6, 3, 4  # vocabulary, drafts per call, tokens generated per trial
START = 0
TRIALS = 20_000  # for the correct sampler; the mutants fail by far with a quarter of that
P_OK = 1e-3  # a correct sampler passes each check (seeds are fixed: this is a deterministic test)
P_BAD = 1e-6  # a mutant must fail


# ---- the independent reference ---------------------------------------------------------------------------------
def chi2_pvalue(counts, probs) -> float:
    """p-value of counts under probs; 0.0 when a cell of probability 0 was observed. Bins expected to hold fewer
    than 5 are pooled (chi-square's validity condition)."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if counts[probs == 0].sum() > 0:
        return 0.0
    support = probs > 0
    obs, exp = counts[support], probs[support] * counts.sum()
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    if len(obs) < 2:
        return 1.0
    if chisquare is not None:
        return float(chisquare(obs, exp).pvalue)
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def markov(seed: int, scale: float, zeros: int, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """A random row-stochastic [V, V] matrix (float64): softmax(logits / temperature) with `zeros` random entries
    per row removed, then, with top_k, only each row's top_k kept (renormalised)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(V, V)) * scale
    for row in logits:
        row[rng.choice(V, size=zeros, replace=False)] = -np.inf
    x = logits / temperature
    if top_k is not None:
        kth = np.sort(x, axis=1)[:, -top_k][:, None]
        x = np.where(x >= kth, x, -np.inf)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def draft_like(P: np.ndarray, seed: int, mix: float) -> np.ndarray:
    """A draft close enough to P to be accepted often, yet different: mix * P + (1 - mix) * another random chain,
    with one token of each row's target support removed."""
    rng = np.random.default_rng(seed)
    Q = mix * P + (1 - mix) * markov(seed, scale=1.5, zeros=2)
    for row, target_row in zip(Q, P):
        row[rng.choice(np.flatnonzero(target_row > 0))] = 0.0
    return Q / Q.sum(axis=1, keepdims=True)


def expected(P: np.ndarray) -> dict[str, np.ndarray]:
    """Exact laws of the first N tokens of the Markov chain P from START."""
    first = np.eye(V)[START]
    t = [first @ np.linalg.matrix_power(P, n) for n in range(1, N + 1)]  # t[i]: the law of token i + 1
    return {"pair12": t[0][:, None] * P, "pair34": t[2][:, None] * P, "token4": t[3]}


def accepted_law(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Law of the number of drafts (0..K) the first call accepts: a draft drawn from q is accepted with probability
    sum_x q(x) min(1, p(x) / q(x)) = sum_x min(p, q)(x), so P(>= m accepted) = (M^m 1)[START], M = min(P, Q)."""
    M = np.minimum(P, Q)
    at_least = [(np.linalg.matrix_power(M, m) @ np.ones(V))[START] for m in range(K + 2)]
    at_least[K + 1] = 0.0
    return np.array([at_least[m] - at_least[m + 1] for m in range(K + 1)])


# ---- the speculative process under test -------------------------------------------------------------------------
def generate(P: np.ndarray, Q: np.ndarray | None, draft_map: list[int] | None = None, trials: int = TRIALS,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`trials` sequences of N tokens from START: each call drafts K tokens (from Q, or deterministically by
    draft_map with draft_probs None), scores them with P and keeps what rejection_sample keeps. Returns the
    sequences [trials, N] and the number of drafts each trial's first call accepted."""
    P32 = torch.tensor(P, dtype=torch.float32)
    Q32 = None if Q is None else torch.tensor(Q, dtype=torch.float32)
    q_cdf = None if Q is None else np.cumsum(Q, axis=1).tolist()
    uniforms = np.random.default_rng(seed + 1).random((trials, N, K)).tolist()  # the drafter's, one per draft
    gen = torch.Generator().manual_seed(seed)
    seqs = np.empty((trials, N), dtype=np.int64)
    first_accepted = np.empty(trials, dtype=np.int64)
    for t in range(trials):
        seq: list[int] = []
        for call in range(N):
            ctx = [seq[-1] if seq else START]
            for j in range(K):
                x = ctx[-1]
                ctx.append(draft_map[x] if q_cdf is None else
                           min(bisect.bisect_right(q_cdf[x], uniforms[t][call][j] * q_cdf[x][-1]), V - 1))
            kept = rs.rejection_sample(P32[ctx], ctx[1:], None if Q32 is None else Q32[ctx[:-1]], gen)
            if call == 0:
                first_accepted[t] = len(kept) - 1
            seq += kept
            if len(seq) >= N:
                break
        seqs[t] = seq[:N]
    return seqs, first_accepted


def pvalues(P: np.ndarray, Q: np.ndarray | None, seqs: np.ndarray, first_accepted: np.ndarray) -> dict[str, float]:
    exp = expected(P)
    out = {
        "pair12": chi2_pvalue(np.bincount(seqs[:, 0] * V + seqs[:, 1], minlength=V * V), exp["pair12"]),
        "pair34": chi2_pvalue(np.bincount(seqs[:, 2] * V + seqs[:, 3], minlength=V * V), exp["pair34"]),
        "token4": chi2_pvalue(np.bincount(seqs[:, 3], minlength=V), exp["token4"]),
    }
    if Q is not None:
        out["accepted"] = chi2_pvalue(np.bincount(first_accepted, minlength=K + 1), accepted_law(P, Q))
    return out


# The target and a different draft: supports differ both ways; P(k drafts accepted) = 0.20, 0.30, 0.27, 0.23.
P_TARGET = markov(seed=1, scale=1.5, zeros=2)
Q_DRAFT = draft_like(P_TARGET, seed=12, mix=0.6)


def test_fixture_is_meaningful():
    """The checks below need a draft that really differs from the target: mass where the target has none and
    a moderate acceptance rate (so rejections and bonus tokens are both common)."""
    assert ((P_TARGET == 0) & (Q_DRAFT > 0)).any(axis=1).all()
    assert ((Q_DRAFT == 0) & (P_TARGET > 0)).any()
    law = accepted_law(P_TARGET, Q_DRAFT)
    assert law.min() > 0.15, law


def test_speculative_sequences_follow_the_target():
    seqs, acc = generate(P_TARGET, Q_DRAFT, seed=0)
    ps = pvalues(P_TARGET, Q_DRAFT, seqs, acc)
    assert all(p > P_OK for p in ps.values()), ps


def test_temperature_and_top_k_target():
    """The target is the sampler's final distribution after temperature 0.7 and top-k 4; the draft samples the
    same logits at temperature 1 without top-k, so it proposes tokens the target has cut. Those must always be
    rejected and never kept, and the kept tokens follow the truncated target."""
    P = markov(seed=3, scale=1.0, zeros=0, temperature=0.7, top_k=4)
    Q = markov(seed=3, scale=1.0, zeros=0)
    assert ((P == 0).sum(axis=1) == V - 4).all() and (Q > 0).all()
    seqs, acc = generate(P, Q, trials=15_000, seed=1)
    ps = pvalues(P, Q, seqs, acc)
    assert all(p > P_OK for p in ps.values()), ps


def test_one_hot_drafts_follow_the_target():
    """draft_probs None (n-gram lookups, greedy drafts): a deterministic guess per token, q one-hot on it. Some
    guesses have target probability 0 (always rejected), the others are accepted with probability p(guess)."""
    draft_map = [int(np.argmax(Q_DRAFT[x])) for x in range(V)]
    assert any(P_TARGET[x, draft_map[x]] == 0 for x in range(V))
    assert any(P_TARGET[x, draft_map[x]] > 0.3 for x in range(V))
    seqs, acc = generate(P_TARGET, None, draft_map=draft_map, trials=10_000, seed=2)
    ps = pvalues(P_TARGET, None, seqs, acc)
    assert all(p > P_OK for p in ps.values()), ps


# ---- negative controls: realistic bugs, each patched into the module, must fail the same checks ------------------
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum()


def _mutate(monkeypatch, name: str) -> None:
    if name == "resample_from_p":  # after a rejection, draw from p again: ignores q
        monkeypatch.setattr(rs, "residual_distribution", lambda p, q: _normalise(p))
    elif name == "abs_residual":  # |p - q| instead of max(p - q, 0)
        monkeypatch.setattr(rs, "residual_distribution", lambda p, q: _normalise((p - q).abs()))
    elif name == "no_bonus":  # all drafts accepted: the drafts only, no bonus token
        real = rs.rejection_sample

        def no_bonus(target_probs, draft_token_ids, draft_probs, generator=None):
            kept = real(target_probs, draft_token_ids, draft_probs, generator)
            return kept[:-1] if len(kept) == len(draft_token_ids) + 1 > 1 else kept

        monkeypatch.setattr(rs, "rejection_sample", no_bonus)
    elif name == "bonus_from_q":  # the bonus drawn from the last draft row instead of p_k
        monkeypatch.setattr(rs, "bonus_distribution", lambda target_probs, draft_probs: draft_probs[-1])
    elif name == "bonus_off_by_one":  # the bonus drawn from p_{k-1}, the row that scored the last draft
        monkeypatch.setattr(rs, "bonus_distribution", lambda target_probs, draft_probs: target_probs[-2])
    else:
        raise AssertionError(name)


# which check each mutant must fail; the first call's accepted count is what a missing bonus changes (the sequences
# stay correct without it: the next call then samples that token, so only the acceptance law reveals it)
MUTANTS = {
    "resample_from_p": "pair12",
    "abs_residual": "pair12",
    "no_bonus": "accepted",
    "bonus_from_q": "pair34",
    "bonus_off_by_one": "pair34",
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_negative_controls_fail(monkeypatch, name):
    _mutate(monkeypatch, name)
    seqs, acc = generate(P_TARGET, Q_DRAFT, trials=TRIALS // 4, seed=0)
    ps = pvalues(P_TARGET, Q_DRAFT, seqs, acc)
    assert ps[MUTANTS[name]] < P_BAD, (name, ps)


# ---- deterministic behaviour --------------------------------------------------------------------------------------
def _one_hot(ids: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), V).float()


@pytest.mark.parametrize("drafts, argmaxes, kept", [
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),  # all accepted: drafts + the bonus argmax
    ([1, 2, 3], [1, 2, 5, 0], [1, 2, 5]),  # rejected at 2: the argmax there
    ([1, 2, 3], [0, 2, 3, 4], [0]),  # rejected at once
    ([], [4], [4]),  # k = 0
])
def test_greedy_target(drafts, argmaxes, kept):
    """One-hot target rows (greedy) and one-hot drafts: drafts are kept while they equal the argmax, then the
    argmax follows; the same for every seed, with draft_probs None or one-hot."""
    target = _one_hot(argmaxes)
    for seed in range(20):
        for q in (None, _one_hot(drafts) if drafts else torch.zeros(0, V)):
            assert rejection_sample(target, drafts, q, torch.Generator().manual_seed(seed)) == kept


def test_draft_probs_none_equals_one_hot():
    """None means q one-hot on the drafts: the same tokens for the same generator seed, token for token."""
    g = torch.Generator().manual_seed(7)
    lengths = set()
    for trial in range(300):
        target = torch.softmax(torch.randn(K + 1, V, generator=g) * 2, dim=-1)
        drafts = torch.randint(V, (K,), generator=g).tolist()
        a = rejection_sample(target, drafts, None, torch.Generator().manual_seed(trial))
        b = rejection_sample(target, drafts, _one_hot(drafts), torch.Generator().manual_seed(trial))
        assert a == b
        lengths.add(len(a))
    assert lengths == set(range(1, K + 2))  # rejections at every position, and full acceptances


def test_k0_draws_from_the_first_row():
    p0 = torch.tensor([0.1, 0.0, 0.4, 0.25, 0.0, 0.25])
    g = torch.Generator().manual_seed(3)
    draws = [rejection_sample(p0[None], [], None, g) for _ in range(8000)]
    assert all(len(d) == 1 for d in draws)
    counts = np.bincount([d[0] for d in draws], minlength=V)
    assert chi2_pvalue(counts, p0.double().numpy()) > P_OK
    assert chi2_pvalue(counts, [0.2, 0.0, 0.3, 0.25, 0.0, 0.25]) < P_BAD  # the check has power


def test_same_generator_state_same_tokens():
    target = torch.softmax(torch.randn(K + 1, V, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = torch.softmax(torch.randn(K, V, generator=torch.Generator().manual_seed(1)), dim=-1)
    runs = [[rejection_sample(target, [0, 1, 2], q, g) for _ in range(50)]
            for g in (torch.Generator().manual_seed(5), torch.Generator().manual_seed(5))]
    assert runs[0] == runs[1]
    torch.manual_seed(5)  # generator None: the default generator, same sequence of uniforms
    assert [rejection_sample(target, [0, 1, 2], q) for _ in range(50)] == runs[0]


def test_residual_distribution():
    p = torch.tensor([0.5, 0.2, 0.3, 0.0, 0.0, 0.0])
    q = torch.tensor([0.2, 0.4, 0.1, 0.3, 0.0, 0.0])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.6, 0.0, 0.4, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(residual_distribution(p, p.clone()), p)  # p == q: p itself, no division by 0


def test_zero_draft_probability_rejects():
    """q(x) == 0 for the drafted x (an inconsistent drafter) rejects, even where p(x) is large; the token after
    comes from the residual max(p - q, 0), which here is p itself."""
    p = torch.tensor([[0.0, 0.9, 0.1, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 0.0]])
    g = torch.Generator().manual_seed(0)
    kept = [rejection_sample(p, [1], q, g) for _ in range(200)]
    assert all(len(k) == 1 and k[0] in (1, 2) for k in kept)
    assert sum(k[0] == 1 for k in kept) > 150


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        rejection_sample(torch.full((2, V), 1 / V), [1, 2], None)
    with pytest.raises(ValueError):
        rejection_sample(torch.full((3, V), 1 / V), [1, 2], torch.full((1, V), 1 / V))
