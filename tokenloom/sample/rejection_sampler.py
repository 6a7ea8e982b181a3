"""Rejection sampling for speculative decoding: which drafted tokens to keep.

The target model scores the k drafts in one pass. Accepting draft x_j with probability min(1, p_j(x_j) / q_j(x_j)),
and on the first rejection drawing from norm(max(p_j - q_j, 0)), makes every kept token distributed exactly as if
the target model had sampled it alone (Leviathan et al. 2023, Chen et al. 2023). When all drafts are accepted the
target's last row gives one bonus token for free. The draft's quality changes only the speed, never the output's law.

All randomness comes from one generator's uniforms (acceptance tests, then an inverse-CDF draw, as in sampler.py),
so a seeded request reproduces.
"""
from __future__ import annotations

import torch

__all__ = ["bonus_distribution", "rejection_sample", "residual_distribution", "sample_from"]


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)): what to sample after rejecting a draft. p itself if that is all zero (p == q)."""
    r = (p - q).clamp_min_(0)
    total = r.sum()
    return torch.where(total > 0, r / total, p)  # no host sync; the unused r / 0 is never read


def bonus_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor | None) -> torch.Tensor:
    """The distribution of the bonus token after all drafts are accepted: the target's last row."""
    return target_probs[-1]


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from probs [V] (need not sum to 1) by inverse CDF; zero-probability tokens are never drawn."""
    cdf = probs.cumsum(0)
    total = cdf[-1]
    u = _uniform(1, generator, probs.device)
    # keep u x total strictly below the total, so rounding cannot step past the last token with mass
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)).reshape(1))
    return int(torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[0] - 1))


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> list[int]:
    """The tokens to keep: the accepted drafts, then one token from the residual at the first rejection, or the
    bonus token from target_probs[k] when all k drafts are accepted (1 to k+1 tokens).

    target_probs: [k+1, V], row j the target's final distribution given the prefix and drafts 0..j-1.
    draft_probs: [k, V], row j the distribution draft j was drawn from; None means one-hot on the drafts.
    generator: the source of every uniform; None means torch's default generator.
    """
    k = len(draft_token_ids)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for {k} drafts (expected {k + 1})")
    if draft_probs is not None and draft_probs.shape[0] != k:
        raise ValueError(f"draft_probs has {draft_probs.shape[0]} rows for {k} drafts")
    if k == 0:
        return [sample_from(bonus_distribution(target_probs, draft_probs), generator)]

    dev = target_probs.device
    rows = torch.arange(k, device=dev)
    ids = torch.tensor(draft_token_ids, device=dev)
    p = target_probs[rows, ids]
    q = torch.ones_like(p) if draft_probs is None else draft_probs[rows, ids]
    ratio = torch.where(q > 0, p / q, 0.0)  # q == 0 (should not happen): reject
    accepted = (_uniform(k, generator, dev) < ratio).tolist()  # probability min(1, p / q)
    n = accepted.index(False) if False in accepted else k

    if n == k:
        return list(draft_token_ids) + [sample_from(bonus_distribution(target_probs, draft_probs), generator)]
    if draft_probs is None:
        q_n = torch.zeros_like(target_probs[n])
        q_n[draft_token_ids[n]] = 1.0
    else:
        q_n = draft_probs[n]
    return list(draft_token_ids[:n]) + [sample_from(residual_distribution(target_probs[n], q_n), generator)]
