"""Vectorised sampler: one pass over the batch's logits applies each row's own settings with tensor ops.

Order of operations (each row): logit_bias -> repetition/presence/frequency penalties -> min_tokens EOS ban ->
[logprobs are taken here, from this distribution, before temperature and truncation] -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> draw.

Every truncation is a threshold on the row's temperature-scaled logits, so the three combine into one:
- top-k keeps logits >= the k-th largest (ties with it included);
- top-p keeps the smallest set of most likely tokens (of the renormalised top-k distribution) whose mass
  reaches top_p, plus any token tied with the least likely of them;
- min-p keeps tokens whose probability is >= min_p x the top one's, i.e. logits >= max + log(min_p).
Nothing sorts the vocabulary. A truncated row first looks at its CANDIDATES largest logits (one partial top-k);
when they hold every allowed token (the usual case) all later work is on them. Otherwise the row's thresholds are
found over the whole vocabulary: a larger partial top-k, then a histogram of the probability mass over logit
buckets that locates the top-p boundary, sorting only the tokens of the bucket it falls in.

The draw is an inverse-CDF lookup, in token-id order, with one uniform number per row: seeded rows take theirs
from their own generator, the others from the engine's. A row's token therefore depends only on its own logits,
settings and generator, never on what else is in the batch, its order, or which of the paths above it took.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.sampling_params import SAMPLING_EPS, SamplingParams

CANDIDATES = 64  # logits every truncated row looks at first (more when a top_k is larger)
TOP_P_CANDIDATES = (512,)  # partial top-ks tried for a top-p boundary beyond the first candidates
HIST_BUCKETS = 2048  # then: buckets of the mass histogram, spanning HIST_RANGE below the row's maximum logit
HIST_RANGE = 32.0  # (e^-32 of the top probability; everything lower shares the last bucket)
NEG_INF = float("-inf")


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


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], saved: list | None = None) -> torch.Tensor:
    """Repetition (transformers/CTRL: over prompt and output), then presence and frequency (OpenAI: over the
    output), in place. Only the logits of tokens a row has seen are touched: gathered, adjusted, scattered.
    With `saved`, the touched positions and their previous values are appended to it (to undo the edit)."""
    idx = [i for i, r in enumerate(rows) if _penalised(r.params) and (r.prompt_token_ids or r.output_token_ids)]
    if not idx:
        return logits
    seen = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in idx]
    width = max(len(s) for s in seen)
    # Pad with the row's own first token: a duplicate entry computes the same value, so the scatter is safe.
    tok = torch.tensor([s + [s[0]] * (width - len(s)) for s in seen], dtype=torch.long)
    row_idx = torch.tensor(idx)[:, None]
    vals = logits[row_idx, tok]
    if saved is not None:
        saved.append(((row_idx, tok), vals))
    params = [rows[i].params for i in idx]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype)[:, None]
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype)[:, None]
    if bool((pres != 0).any() or (freq != 0).any()):
        # How often each entry's token was generated: count it in the row's sorted output.
        outs = [rows[i].output_token_ids for i in idx]
        out_w = max(1, max(len(o) for o in outs))
        out = torch.tensor([o + [-1] * (out_w - len(o)) for o in outs], dtype=torch.long).sort(-1).values
        c = (torch.searchsorted(out, tok, right=True) - torch.searchsorted(out, tok)).to(logits.dtype)
        vals = vals - freq * c - pres * (c > 0).to(logits.dtype)
    logits[row_idx, tok] = vals
    return logits


class _Workspace:
    """Reusable buffers for the [rows, vocabulary] temporaries. A fresh tensor that large costs page faults
    on every step (the allocator hands such blocks back to the OS when they are freed), often more than the
    arithmetic done in it."""

    # Per buffer: 4 Mi elements (16 MiB of float32, e.g. 64 rows of a 64k vocabulary); larger requests are
    # plain allocations. Each buffer is as large as the rows that used it (bench sampling's 32 mixed rows of
    # a 49k vocabulary keep about 28 MiB in all).
    MAX_ELEMENTS = 1 << 22

    def __init__(self):
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def __call__(self, key: str, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = rows * cols
        if n > self.MAX_ELEMENTS:
            return torch.empty(rows, cols, dtype=dtype)
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(key, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(rows, cols)


def _select(ws: _Workspace, key: str, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The given rows of x: x itself when that is all of them, else a copy in the workspace."""
    if len(rows) == x.shape[0]:
        return x
    return torch.index_select(x, 0, torch.tensor(rows), out=ws(key, len(rows), x.shape[1], x.dtype))


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the column where the running sum of w (made in place) first exceeds u x its total."""
    cdf = w.cumsum_(-1)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=cdf.shape[1] - 1)[:, 0]


def _draw_candidates(vals: torch.Tensor, ids: torch.Tensor, thr: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, in token-id order, over each row's candidates (sorted largest first) >= thr: what the
    draw over the whole row gives, since left-out tokens only add exact zeros to the running sum."""
    ids, order = ids.sort(dim=-1)
    w = (vals - vals[:, :1]).exp_().masked_fill_(vals < thr[:, None], 0.0).gather(1, order)
    return ids.gather(1, _inverse_cdf(w, u)[:, None])[:, 0]


class _FullRows:
    """Rows handled over the whole vocabulary: their logits x, max, neg = x - max (-inf below floor) and
    w = exp(neg), all in the workspace under the given key."""

    def __init__(self, ws: _Workspace, key: str, x: torch.Tensor, rows: list[int], vmax: torch.Tensor | None,
                 floor: torch.Tensor | None = None):
        self.x = _select(ws, key + ".x", x, rows)
        self.vmax = self.x.amax(-1) if vmax is None else vmax
        n, V = self.x.shape
        self.neg = torch.sub(self.x, self.vmax[:, None], out=ws(key + ".neg", n, V))
        if floor is not None and bool((floor > NEG_INF).any()):
            self.neg.masked_fill_(torch.lt(self.x, floor[:, None], out=ws(key + ".mask", n, V, torch.bool)), NEG_INF)
        self.w = torch.exp(self.neg, out=ws(key + ".w", n, V))
        self.ws, self.key = ws, key

    def take(self, at: list[int]) -> _FullRows:
        """A subset of these rows (copies, in the workspace under a key of their own)."""
        if len(at) == self.x.shape[0]:
            return self
        sub = object.__new__(_FullRows)
        sub.ws, sub.key = self.ws, self.key + ".sub"
        sub.x = _select(self.ws, sub.key + ".x", self.x, at)
        sub.neg = _select(self.ws, sub.key + ".neg", self.neg, at)
        sub.w = _select(self.ws, sub.key + ".w", self.w, at)
        sub.vmax = self.vmax[at]
        return sub

    def nucleus(self, top_p: torch.Tensor) -> torch.Tensor:
        """Per row: the smallest logit inside the top_p nucleus (of the distribution w), exact. Rows try
        TOP_P_CANDIDATES partial top-ks first (done once the boundary falls inside them); the others histogram
        their mass over logit buckets, which locates the bucket holding the boundary, and sort only its tokens."""
        x, neg, w = self.x, self.neg, self.w
        R, V = x.shape
        target = top_p.double() * w.sum(-1).double()  # the mass the nucleus must reach
        thr = torch.empty(R, dtype=x.dtype)
        todo = torch.arange(R)
        for c in TOP_P_CANDIDATES:
            if c >= V:
                break
            vals, idx = (neg if len(todo) == R else neg[todo]).topk(c, dim=-1)
            wv = vals.exp().double()
            n_keep = (wv.cumsum(-1) - wv < target[todo, None]).sum(-1).clamp_(min=1)
            thr[todo] = x[todo[:, None], idx.gather(1, (n_keep - 1)[:, None])][:, 0]
            todo = todo[n_keep >= c]  # the first token left out might still be inside
            if not len(todo):
                return thr
        if len(todo) < R:
            x, neg, w, target = x[todo], neg[todo], w[todo], target[todo]
        n = len(todo)
        ws, key = self.ws, self.key + ".hist"
        # bucket j holds the logits in (max - (j + 1) * width, max - j * width]; the last one all lower ones
        scaled = torch.mul(neg, -HIST_BUCKETS / HIST_RANGE, out=ws(key + ".f", n, V)).floor_()
        bucket = ws(key + ".b", n, V, torch.long).copy_(scaled.clamp_(max=HIST_BUCKETS - 1))
        mass = torch.zeros(n, HIST_BUCKETS, dtype=w.dtype).scatter_add_(1, bucket, w).double().cumsum_(-1)
        b = (mass < target[:, None]).sum(-1).clamp_(max=HIST_BUCKETS - 1)  # the bucket where the nucleus ends
        base = torch.where(b > 0, mass.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)  # mass above it
        inside = torch.eq(bucket, b[:, None], out=ws(key + ".in", n, V, torch.bool))
        count = inside.sum(-1)
        masked = ws(key + ".f", n, V).copy_(neg).masked_fill_(~inside, NEG_INF)
        vals, idx = masked.topk(int(count.max()), dim=-1)
        wv = vals.exp().double()
        n_keep = (base[:, None] + wv.cumsum(-1) - wv < target[:, None]).sum(-1)
        n_keep = torch.minimum(n_keep.clamp_(min=1), count)
        thr[todo] = x.gather(1, idx.gather(1, (n_keep - 1)[:, None]))[:, 0]
        return thr

    def draw(self, thr: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw over the whole rows, in token-id order, leaving out tokens with x < thr."""
        if thr is not None and bool((thr > NEG_INF).any()):
            n, V = self.x.shape
            self.w.masked_fill_(torch.lt(self.x, thr[:, None], out=self.ws(self.key + ".mask", n, V, torch.bool)), 0.0)
        return _inverse_cdf(self.w, u)


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.ws = _Workspace()

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        B, V = logits.shape
        if logits.dtype != torch.float32:
            logits, saved = self.ws("logits", B, V).copy_(logits), None
        else:  # the caller's tensor: edited in place (sparse), and put back as it was before returning
            saved = []
        try:
            self._edit(logits, rows, saved)
            return self._run(logits, rows)
        finally:
            for index, values in reversed(saved or []):
                logits.index_put_(index, values)

    @staticmethod
    def _edit(logits: torch.Tensor, rows: list[SamplingRow], saved: list | None) -> None:
        """logit_bias, penalties, the min_tokens ban: sparse edits (a handful of ids per row) applied in place,
        recording what they overwrite in `saved` (when not None)."""
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
        if bias_r:
            index = (torch.tensor(bias_r), torch.tensor(bias_c))
            before = logits[index]
            if saved is not None:
                saved.append((index, before))
            logits.index_put_(index, before + torch.tensor(bias_v))
        if any(_penalised(r.params) for r in rows):
            apply_penalties(logits, rows, saved)
        if ban_r:
            index = (torch.tensor(ban_r), torch.tensor(ban_c))
            if saved is not None:
                saved.append((index, logits[index]))
            logits.index_put_(index, torch.tensor(NEG_INF))

    def _run(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        B, V = logits.shape
        ws = self.ws
        sampled = [i for i, r in enumerate(rows) if r.params.temperature >= SAMPLING_EPS]
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < SAMPLING_EPS]
        tokens = torch.empty(B, dtype=torch.long)
        if greedy:  # max(dim).indices: the first maximum, like argmax, and faster on CPU
            tokens[greedy] = _select(ws, "greedy", logits, greedy).max(-1).indices
        if sampled:
            if 4 * len(greedy) <= B:  # scale every row (greedy ones by 1): cheaper than copying the others out
                temp = torch.tensor([max(r.params.temperature, SAMPLING_EPS) for r in rows])
                x = torch.div(logits, temp[:, None], out=ws("x", B, V))
                at = sampled
            else:
                temp = torch.tensor([rows[i].params.temperature for i in sampled])
                x = _select(ws, "x", logits, sampled).div_(temp[:, None])
                at = list(range(len(sampled)))
            tokens[sampled] = self._sample(x, at, [rows[i] for i in sampled])

        token_list = tokens.tolist()
        out_logprobs: list = [None] * B
        rows_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if rows_lp:
            lp = _select(ws, "lp", logits, rows_lp)
            m = lp.amax(-1, keepdim=True)
            lse = m + torch.sub(lp, m, out=ws("lp.exp", len(rows_lp), V)).exp_().sum(-1, keepdim=True).log_()
            chosen = (lp.gather(1, tokens[rows_lp][:, None]) - lse)[:, 0].tolist()
            top_n = max(rows[i].params.logprobs for i in rows_lp)
            if top_n:
                top_vals, top_ids = lp.topk(top_n, dim=-1)
                top_vals, top_ids = (top_vals - lse).tolist(), top_ids.tolist()
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

    def _sample(self, x: torch.Tensor, at: list[int], rows: list[SamplingRow]) -> torch.Tensor:
        """Truncation and the draw, for rows that sample: rows[j]'s temperature-scaled logits are x[at[j]]."""
        B, V = len(rows), x.shape[1]
        ws = self.ws
        u = self._uniforms(rows)
        out = torch.empty(B, dtype=torch.long)
        ks = [r.params.top_k for r in rows]
        ps = [r.params.top_p for r in rows]
        ms = [r.params.min_p for r in rows]
        trunc = [i for i in range(B) if ks[i] > 0 or ps[i] < 1 or ms[i] > 0]
        plain = [i for i in range(B) if not (ks[i] > 0 or ps[i] < 1 or ms[i] > 0)]
        full: list[tuple[list[int], _FullRows, torch.Tensor | None]] = []  # drawn over the whole vocabulary

        if trunc:
            kf = torch.tensor([ks[i] for i in trunc])
            pf = torch.tensor([ps[i] for i in trunc])
            mf = torch.tensor([ms[i] for i in trunc])
            n_c = min(V, max(CANDIDATES, int(kf.max())) + 1)
            complete = n_c == V
            xf = _select(ws, "xf", x, [at[i] for i in trunc])
            vals, ids = xf.topk(n_c, dim=-1)  # largest first
            vmax = vals[:, 0]
            kth = vals.gather(1, (kf.clamp(1, n_c) - 1)[:, None])[:, 0]
            thr = torch.where(kf > 0, kth, NEG_INF)  # each row's threshold so far
            # sure: the candidates hold every allowed token, and the thresholds found from them are exact
            sure = torch.ones(len(trunc), dtype=torch.bool) if complete else (kf <= 0) | (vals[:, -1] < thr)
            pr = [j for j, i in enumerate(trunc) if ps[i] < 1]
            nk = [] if complete else [j for j in pr if ks[trunc[j]] <= 0]
            whole = None
            if pr:
                wc = (vals[pr] - vmax[pr, None]).exp_().masked_fill_(vals[pr] < thr[pr, None], 0.0).double()
                total = wc.sum(-1)
                if nk:  # without top-k, the distribution to renormalise is the whole vocabulary's
                    whole = _FullRows(ws, "nk", xf, nk, vmax[nk])
                    at_pr = {j: n for n, j in enumerate(pr)}
                    total[[at_pr[j] for j in nk]] = whole.w.sum(-1).double()
                n_keep = (wc.cumsum(-1) - wc < pf[pr, None].double() * total[:, None]).sum(-1).clamp_(min=1)
                thr[pr] = torch.maximum(thr[pr], vals[pr].gather(1, (n_keep - 1)[:, None])[:, 0])
                if not complete:
                    sure[pr] &= n_keep < n_c  # the nucleus ended inside the candidates
            log_min_p = torch.where(mf > 0, mf.log(), NEG_INF)
            thr = torch.maximum(thr, vmax + log_min_p)  # p >= min_p * p_max  <=>  x >= x_max + log(min_p)
            if not complete:
                sure &= vals[:, -1] < thr  # the first token left out of the candidates is excluded
            s = sure.nonzero().flatten()
            if len(s):
                out[[trunc[j] for j in s.tolist()]] = _draw_candidates(vals[s], ids[s], thr[s], u[trunc][s])
            unsure = (~sure).nonzero().flatten().tolist()
            if unsure:  # thresholds over the whole vocabulary (the top-k and min-p ones are exact already)
                at_nk = {j: n for n, j in enumerate(nk)}
                for group in ([j for j in unsure if j in at_nk], [j for j in unsure if j not in at_nk]):
                    if not group:
                        continue
                    top_k_thr = torch.where(kf[group] > 0, kth[group], NEG_INF)
                    if group[0] in at_nk:
                        fr = whole.take([at_nk[j] for j in group])
                    else:
                        fr = _FullRows(ws, "unsure", xf, group, vmax[group], top_k_thr)
                    t = top_k_thr
                    gp = [n for n, j in enumerate(group) if ps[trunc[j]] < 1]
                    if gp:
                        part = fr if len(gp) == len(group) else fr.take(gp)
                        t[gp] = torch.maximum(t[gp], part.nucleus(pf[group][gp]))
                    t = torch.maximum(t, fr.vmax + log_min_p[group])
                    full.append(([trunc[j] for j in group], fr, t))
        if plain:
            full.append((plain, _FullRows(ws, "plain", x, [at[i] for i in plain], None), None))
        for idx, fr, t in full:
            out[idx] = fr.draw(t, u[idx])
        return out
