"""Vectorised sampler: one pass over the batch's logits applies each row's own settings with tensor ops.

Order of operations (each row): logit_bias -> repetition/presence/frequency penalties -> min_tokens EOS ban ->
[logprobs are taken here, from this distribution, before temperature and truncation] -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> draw.

Every truncation is a threshold on the row's (temperature-scaled) logits, so the three combine into one mask:
- top-k keeps logits >= the k-th largest (ties with it included);
- top-p keeps the smallest set of most likely tokens (of the top-k renormalised distribution) whose mass reaches
  top_p, plus any token tied with the least likely of them. Its threshold is found among a row's top candidates
  (a partial top-k, not a full-vocabulary sort): exact whenever the candidates' mass already reaches top_p,
  otherwise the row retries with more candidates and finally a full sort;
- min-p keeps tokens whose probability is >= min_p x the top one's, i.e. logits >= max + log(min_p).
The draw is an inverse-CDF lookup with one uniform number per row. Seeded rows take theirs from their own
generator (one number per step, however large the vocabulary or the batch), so their tokens do not depend on
what else is in the batch or its order; the other rows draw from the engine's generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenloom.sampling_params import SAMPLING_EPS, SamplingParams

# Truncated rows look at their CANDIDATES largest logits (more with a larger top_k) first; a top-p nucleus that
# does not end inside them is searched among TOP_P_CANDIDATES, then with a full sort.
CANDIDATES = 64
TOP_P_CANDIDATES = (1024,)


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: list of (token_id, logprob) - the chosen token first, then the top-N; None where not asked.
    logprobs: list[list[tuple[int, float]] | None]


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (transformers/CTRL: over prompt and output), then presence and frequency (OpenAI: over the
    output), in place. Only the logits of tokens a row has seen are touched (gathered, adjusted, scattered)."""
    idx = [i for i, r in enumerate(rows) if (r.params.repetition_penalty != 1.0 or r.params.presence_penalty
                                             or r.params.frequency_penalty)
           and (r.prompt_token_ids or r.output_token_ids)]
    if not idx:
        return logits
    V = logits.shape[1]
    seen = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in idx]
    # Pad with the row's own first token: a duplicate entry computes the same value, so the scatter is safe.
    width = max(len(s) for s in seen)
    tok = torch.tensor([s + [s[0]] * (width - len(s)) for s in seen], dtype=torch.long)
    row_idx = torch.tensor(idx)[:, None]
    vals = logits[row_idx, tok]
    rep = torch.tensor([rows[i].params.repetition_penalty for i in idx], dtype=logits.dtype)[:, None]
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    pres = torch.tensor([rows[i].params.presence_penalty for i in idx], dtype=logits.dtype)[:, None]
    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx], dtype=logits.dtype)[:, None]
    if bool((pres != 0).any() or (freq != 0).any()):
        out_tok = _pad([rows[i].output_token_ids for i in idx], V)
        counts = torch.zeros(len(idx), V + 1, dtype=logits.dtype)
        counts.scatter_add_(1, out_tok, torch.ones(out_tok.shape, dtype=logits.dtype))
        c = counts.gather(1, tok)
        vals = vals - freq * c - pres * (c > 0).to(logits.dtype)
    logits[row_idx, tok] = vals
    return logits


def _top_p_threshold(x: torch.Tensor, top_p: torch.Tensor, candidates=TOP_P_CANDIDATES) -> torch.Tensor:
    """Per row of x (logits, already top-k masked): the smallest logit inside the top_p nucleus. Rows try
    `candidates` partial top-ks in turn (exact once the nucleus ends inside them), then a full sort."""
    B, V = x.shape
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    thr = torch.empty(B, dtype=x.dtype)
    todo = torch.arange(B)
    for c in tuple(candidates) + (V,):
        c = min(c, V)
        sub = x[todo] if len(todo) < B else x
        vals = sub.topk(c, dim=-1).values if c < V else sub.sort(dim=-1, descending=True).values
        probs = (vals - lse[todo]).exp()
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each candidate
        n_keep = (before < top_p[todo, None]).sum(-1).clamp(min=1)
        thr[todo] = vals.gather(1, (n_keep - 1)[:, None])[:, 0]
        # Exact when the first candidate left out is already beyond the nucleus.
        unsure = n_keep >= c
        if c >= V or not bool(unsure.any()):
            break
        todo = todo[unsure]
    return thr


def _draw(vals: torch.Tensor, keep: torch.Tensor | None, ids: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over each row's kept entries (keep None = all), in token-id order. vals: logits (the
    row's maximum in column 0 when ids is given), ids: their token ids (None = the columns are the ids),
    u: uniforms in [0, 1). A row gives the same token whether drawn from its candidates or the whole vocabulary:
    excluded tokens add exact zeros to the running sum."""
    if ids is not None:
        vmax = vals[:, :1]
        ids, order = ids.sort(dim=-1)
        vals, keep = vals.gather(1, order), keep.gather(1, order)
    else:
        vmax = vals.max(-1, keepdim=True).values
    w = (vals - vmax).exp_()
    if keep is not None:
        w.masked_fill_(~keep, 0.0)
    cdf = w.cumsum_(-1)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    pos = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
    return pos[:, 0] if ids is None else ids.gather(1, pos)[:, 0]


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        B, V = logits.shape
        orig = logits
        logits = logits.float()

        # Sparse per-row edits (a handful of ids each), gathered and applied in one indexing op each.
        bias_r, bias_c, bias_v, ban_r, ban_c = [], [], [], [], []
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                bias_r += [i] * len(p.logit_bias)
                bias_c += p.logit_bias.keys()
                bias_v += p.logit_bias.values()
            if len(r.output_token_ids) < p.min_tokens:
                ban = list(r.eos_token_ids) + list(p.stop_token_ids)
                ban_r += [i] * len(ban)
                ban_c += ban
        penalised = any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty
                        or r.params.frequency_penalty for r in rows)
        if (bias_r or ban_r or penalised) and logits.data_ptr() == orig.data_ptr():
            logits = logits.clone()  # never modify the caller's tensor
        if bias_r:
            logits.index_put_((torch.tensor(bias_r), torch.tensor(bias_c)), torch.tensor(bias_v), accumulate=True)
        if penalised:
            logits = apply_penalties(logits, rows)
        if ban_r:
            logits[torch.tensor(ban_r), torch.tensor(ban_c)] = float("-inf")

        tokens = torch.empty(B, dtype=torch.long)
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < SAMPLING_EPS]
        sampled = [i for i, r in enumerate(rows) if r.params.temperature >= SAMPLING_EPS]
        if len(greedy) == B:
            tokens = logits.argmax(-1)
        elif greedy:
            g = torch.tensor(greedy)
            tokens[g] = logits[g].argmax(-1)
        if sampled:
            s = torch.tensor(sampled) if len(sampled) < B else None
            tokens_s = self._sample(logits[s] if s is not None else logits, [rows[i] for i in sampled])
            if s is None:
                tokens = tokens_s
            else:
                tokens[s] = tokens_s

        token_list = tokens.tolist()
        out_logprobs: list = [None] * B
        rows_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if rows_lp:
            lp_idx = torch.tensor(rows_lp)
            logprobs = torch.log_softmax(logits[lp_idx], dim=-1)
            chosen = logprobs.gather(1, tokens[lp_idx][:, None])[:, 0].tolist()
            top_n = max(rows[i].params.logprobs for i in rows_lp)
            top_vals, top_ids = (logprobs.topk(top_n, dim=-1) if top_n else (None, None))
            if top_n:
                top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(rows_lp):
                entry = [(token_list[i], chosen[j])]
                n = rows[i].params.logprobs
                if n:
                    entry += list(zip(top_ids[j][:n], top_vals[j][:n]))
                out_logprobs[i] = entry
        return SamplerOutput(token_list, out_logprobs)

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One uniform number per row: seeded rows from their own generator, the others from the engine's."""
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):
            return torch.rand(len(rows), generator=self.generator)
        u = torch.empty(len(rows))
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, generator=r.generator)[0]
        return u

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, truncation and the draw for rows that sample. logits: [len(rows), V] (not modified)."""
        B, V = logits.shape
        neg_inf = float("-inf")
        x = logits / torch.tensor([r.params.temperature for r in rows])[:, None]
        top_k = torch.tensor([r.params.top_k for r in rows])
        top_p = torch.tensor([r.params.top_p for r in rows])
        min_p = torch.tensor([r.params.min_p for r in rows])
        u = self._uniforms(rows)
        out = torch.empty(B, dtype=torch.long)
        thr = torch.full((B,), neg_inf)  # per row: the smallest allowed (scaled) logit
        full = torch.ones(B, dtype=torch.bool)  # rows to draw over the whole vocabulary

        f = ((top_k > 0) | (top_p < 1) | (min_p > 0)).nonzero().flatten()
        if len(f):
            # Truncated rows: their largest logits (candidates) usually hold every allowed token; then all the
            # work after one partial top-k is on those.
            n_c = min(V, max(CANDIDATES, int(top_k[f].max())) + 1)
            complete = n_c == V
            xf = x[f] if len(f) < B else x
            vals, ids = xf.topk(n_c, dim=-1)  # largest first
            kf, pf, mf = top_k[f], top_p[f], min_p[f]
            kth = vals.gather(1, (kf.clamp(1, n_c) - 1)[:, None])[:, 0]
            tf = torch.where(kf > 0, kth, neg_inf)
            # sure: the candidates hold every allowed token, and the thresholds computed from them are exact
            sure = torch.full_like(kf, complete, dtype=torch.bool) | (vals[:, -1] < tf) | (kf <= 0)
            pr = (pf < 1).nonzero().flatten()
            if len(pr):
                masked = vals[pr].masked_fill(vals[pr] < tf[pr, None], neg_inf)  # renormalise within top-k
                lse = masked.logsumexp(-1)
                no_k = (kf[pr] <= 0).nonzero().flatten()
                if len(no_k) and not complete:  # without top-k, the normaliser is over the whole vocabulary
                    lse[no_k] = xf[pr[no_k]].logsumexp(-1)
                probs = (masked - lse[:, None]).exp()
                before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each candidate
                n_keep = (before < pf[pr, None]).sum(-1).clamp(min=1)
                tf[pr] = torch.maximum(tf[pr], masked.gather(1, (n_keep - 1)[:, None])[:, 0])
                if not complete:
                    sure[pr] &= n_keep < n_c  # the nucleus ended inside the candidates
            if bool((mf > 0).any()):
                # p >= min_p * p_max  <=>  x >= x_max + log(min_p); the top token survives every filter.
                tf = torch.maximum(tf, vals[:, 0] + torch.where(mf > 0, mf.log(), neg_inf))
            if not complete:
                sure &= vals[:, -1] < tf  # the first token left out of the candidates is excluded
            s = sure.nonzero().flatten()
            if len(s):
                out[f[s]] = _draw(vals[s], vals[s] >= tf[s, None], ids[s], u[f[s]])
                full[f[s]] = False
            ns = (~sure).nonzero().flatten()
            if len(ns):  # thresholds again, from the whole vocabulary (a top-k value is exact already)
                tu = torch.where(kf[ns] > 0, kth[ns], neg_inf)
                pu = (pf[ns] < 1).nonzero().flatten()
                if len(pu):
                    xp = xf[ns[pu]]
                    xp = xp.masked_fill(xp < tu[pu, None], neg_inf)
                    tu[pu] = torch.maximum(tu[pu], _top_p_threshold(xp, pf[ns[pu]]))
                tu = torch.maximum(tu, vals[ns, 0] + torch.where(mf[ns] > 0, mf[ns].log(), neg_inf))
                thr[f[ns]] = tu

        r = full.nonzero().flatten()
        if len(r):
            xr = x[r] if len(r) < B else x
            tr = thr[r]
            keep = xr >= tr[:, None] if bool((tr > neg_inf).any()) else None
            out[r] = _draw(xr, keep, None, u[r])
        return out
