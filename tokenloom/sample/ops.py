"""Top-k / top-p / min-p truncation and the inverse-CDF draw, over temperature-scaled logits, with no vocabulary sort.

Every truncation is a threshold on the row's temperature-scaled logits, so the three combine into one:
- top-k keeps logits >= the k-th largest (ties with it included);
- top-p keeps the smallest set of most likely tokens (of the renormalised top-k distribution) whose mass
  reaches top_p, plus any token tied with the least likely of them;
- min-p keeps tokens whose probability is >= min_p x the top one's, i.e. logits >= max + log(min_p).
A truncated row first looks at its CANDIDATES largest logits (one partial top-k); when they hold every allowed token
(the usual case) all later work is on them. Otherwise the row's thresholds are found over the whole vocabulary: a
larger partial top-k, then a histogram of the probability mass over logit buckets that locates the top-p boundary,
sorting only the tokens of the bucket it falls in.

The draw is an inverse-CDF lookup, in token-id order, with one uniform number per row. A row's token therefore
depends only on its own logits, settings and uniform, never on what else is in the batch, its order, or which of the
paths above it took. Every tensor made here is on the logits' device.
"""
from __future__ import annotations

import torch

from tokenloom.sample.metadata import Truncation, index

CANDIDATES = 64  # logits every truncated row looks at first (more when a top_k is larger)
TOP_P_CANDIDATES = (512,)  # partial top-ks tried for a top-p boundary beyond the first candidates
HIST_BUCKETS = 2048  # then: buckets of the mass histogram, spanning HIST_RANGE below the row's maximum logit
HIST_RANGE = 32.0  # (e^-32 of the top probability; everything lower shares the last bucket)
NEG_INF = float("-inf")
# what a reported logprob of an impossible token reads (vLLM's convention): JSON has no -inf
LOGPROB_FLOOR = -9999.0
# torch's CPU exp takes a slow path for inputs below about -87 (its result underflows float32): ~13x slower over
# a row that a grammar mask or a truncation filled with -inf. Such rows exponentiate max(x, EXP_MIN) instead and
# subtract EXP_TINY (just above exp(EXP_MIN)) clamped at 0: -inf gives exactly 0, and so does anything whose
# probability relative to the row's top token is below 2e-35; everything else changes by less than float32's
# resolution. EXP_MIN keeps every intermediate a normal float (denormals are slow too), and bool masks over the
# vocabulary would cost more than the exp they save.
EXP_MIN = -80.0
EXP_TINY = 2e-35


def exp_nonpositive(neg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = exp(neg) for neg <= 0 (logits minus their row maximum); 0 where neg is -inf (see EXP_MIN). Off the
    CPU, where exp has no slow path, always the plain exp (no read of the minimum back to the host)."""
    if _off_host(neg) or float(neg.min()) >= EXP_MIN:
        return torch.exp(neg, out=out)
    torch.clamp(neg, min=EXP_MIN, out=out).exp_()
    return out.sub_(EXP_TINY).clamp_(min=0.0)


def reportable_logprobs(x: torch.Tensor) -> torch.Tensor:
    """x with -inf (a masked or impossible token) and NaN (overflowing penalties) as LOGPROB_FLOOR."""
    return x.nan_to_num(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)


def _off_host(x: torch.Tensor) -> bool:
    """x is on an accelerator: a mask that may change nothing is applied anyway rather than checked first, which
    would wait for the device to read the answer back."""
    return x.device.type != "cpu"


# Columns summed per partial sum by row_sum.
ROW_SUM_CHUNK = 1024


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1) of [rows, V], each row's the same bits whatever the other rows: a plain sum over one row of a
    large vocabulary is split between the threads, over many rows each is summed whole, so their rounding
    differs. Here every row is summed in fixed chunks, then the chunk sums, each reduction too small to split."""
    rows, V = x.shape
    if V <= ROW_SUM_CHUNK:
        return x.sum(-1)
    whole = V - V % ROW_SUM_CHUNK
    parts = x[:, :whole].reshape(rows, whole // ROW_SUM_CHUNK, ROW_SUM_CHUNK).sum(-1)
    if whole < V:
        parts = torch.cat([parts, x[:, whole:].sum(-1, keepdim=True)], 1)
    return parts.sum(-1)


class Workspace:
    """Reusable buffers for the [rows, vocabulary] temporaries, per device. A fresh tensor that large costs page
    faults on every step (the allocator hands such blocks back to the OS when they are freed), often more than the
    arithmetic done in it."""

    # Per buffer: 4 Mi elements (16 MiB of float32, e.g. 64 rows of a 64k vocabulary); larger requests are
    # plain allocations. Each buffer is as large as the rows that used it (bench sampling's 32 mixed rows of
    # a 49k vocabulary keep about 28 MiB in all).
    MAX_ELEMENTS = 1 << 22

    def __init__(self):
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def __call__(self, key: str, rows: int, cols: int, dtype: torch.dtype = torch.float32, *,
                 device: torch.device) -> torch.Tensor:
        n = rows * cols
        if n > self.MAX_ELEMENTS:
            return torch.empty(rows, cols, dtype=dtype, device=device)
        buf = self._bufs.get((key, dtype, device))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(key, dtype, device)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(rows, cols)

    def clear(self) -> None:
        """Drop the buffers (an idle engine gives their memory back; the next step allocates afresh)."""
        self._bufs.clear()


def select_rows(ws: Workspace, key: str, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The given rows (ascending) of x: x itself when that is all of them, else a copy in the workspace."""
    if len(rows) == x.shape[0]:
        return x
    out = ws(key, len(rows), x.shape[1], x.dtype, device=x.device)
    return torch.index_select(x, 0, index(rows, x.device), out=out)


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

    def __init__(self, ws: Workspace, key: str, x: torch.Tensor, rows: list[int], vmax: torch.Tensor | None,
                 floor: torch.Tensor | None = None):
        self.x = select_rows(ws, key + ".x", x, rows)
        self.vmax = self.x.amax(-1) if vmax is None else vmax
        n, V = self.x.shape
        dev = self.x.device
        self.neg = torch.sub(self.x, self.vmax[:, None], out=ws(key + ".neg", n, V, device=dev))
        if floor is not None and (_off_host(floor) or bool((floor > NEG_INF).any())):
            below = torch.lt(self.x, floor[:, None], out=ws(key + ".mask", n, V, torch.bool, device=dev))
            self.neg.masked_fill_(below, NEG_INF)
        self.w = exp_nonpositive(self.neg, ws(key + ".w", n, V, device=dev))
        self.ws, self.key = ws, key

    def take(self, at: list[int]) -> _FullRows:
        """A subset of these rows (copies, in the workspace under a key of their own)."""
        if len(at) == self.x.shape[0]:
            return self
        sub = object.__new__(_FullRows)
        sub.ws, sub.key = self.ws, self.key + ".sub"
        sub.x = select_rows(self.ws, sub.key + ".x", self.x, at)
        sub.neg = select_rows(self.ws, sub.key + ".neg", self.neg, at)
        sub.w = select_rows(self.ws, sub.key + ".w", self.w, at)
        sub.vmax = self.vmax[index(at, self.x.device)]
        return sub

    def nucleus(self, top_p: torch.Tensor) -> torch.Tensor:
        """Per row: the smallest logit inside the top_p nucleus (of the distribution w), exact. Rows try
        TOP_P_CANDIDATES partial top-ks first (done once the boundary falls inside them); the others histogram
        their mass over logit buckets, which locates the bucket holding the boundary, and sort only its tokens."""
        x, neg, w = self.x, self.neg, self.w
        R, V = x.shape
        dev = x.device
        target = top_p.double() * row_sum(w).double()  # the mass the nucleus must reach
        thr = torch.empty(R, dtype=x.dtype, device=dev)
        todo = torch.arange(R, device=dev)
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
        thr[todo] = self._histogram(x, neg, w, target)
        return thr

    def _histogram(self, x, neg, w, target) -> torch.Tensor:
        """The nucleus boundary of rows whose boundary lies beyond every partial top-k tried."""
        n, V = x.shape
        dev = x.device
        ws, key = self.ws, self.key + ".hist"
        # bucket j holds the logits in (max - (j + 1) * width, max - j * width]; the last one all lower ones
        scaled = torch.mul(neg, -HIST_BUCKETS / HIST_RANGE, out=ws(key + ".f", n, V, device=dev)).floor_()
        bucket = ws(key + ".b", n, V, torch.long, device=dev).copy_(scaled.clamp_(max=HIST_BUCKETS - 1))
        mass = torch.zeros(n, HIST_BUCKETS, dtype=w.dtype, device=dev).scatter_add_(1, bucket, w)
        mass = mass.double().cumsum_(-1)
        b = (mass < target[:, None]).sum(-1).clamp_(max=HIST_BUCKETS - 1)  # the bucket where the nucleus ends
        base = torch.where(b > 0, mass.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)  # mass above it
        inside = torch.eq(bucket, b[:, None], out=ws(key + ".in", n, V, torch.bool, device=dev))
        count = inside.sum(-1)
        masked = ws(key + ".f", n, V, device=dev).copy_(neg).masked_fill_(~inside, NEG_INF)
        vals, idx = masked.topk(int(count.max()), dim=-1)
        wv = vals.exp().double()
        n_keep = (base[:, None] + wv.cumsum(-1) - wv < target[:, None]).sum(-1)
        n_keep = torch.minimum(n_keep.clamp_(min=1), count)
        return x.gather(1, idx.gather(1, (n_keep - 1)[:, None]))[:, 0]

    def draw(self, thr: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw over the whole rows, in token-id order, leaving out tokens with x < thr."""
        if thr is not None and (_off_host(thr) or bool((thr > NEG_INF).any())):
            n, V = self.x.shape
            below = torch.lt(self.x, thr[:, None], out=self.ws(self.key + ".mask", n, V, torch.bool,
                                                                device=self.x.device))
            self.w.masked_fill_(below, 0.0)
        return _inverse_cdf(self.w, u)


def sample(ws: Workspace, x: torch.Tensor, at: list[int], tr: Truncation | None, plain: list[int],
           u: torch.Tensor, keep_thresholds: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Truncation and the draw for the sampled rows: row j's temperature-scaled logits are x[at[j]], tr the
    truncating rows among them (positions j), plain the others, u their uniforms. Returns the tokens and, when
    asked, each row's final threshold (the draw's support is x >= it; -inf for plain rows)."""
    n, dev = len(at), x.device
    out = torch.empty(n, dtype=torch.long, device=dev)
    thr_all = torch.full((n,), NEG_INF, dtype=x.dtype, device=dev) if keep_thresholds else None
    full: list[tuple[list[int], _FullRows, torch.Tensor | None]] = []  # drawn over the whole vocabulary
    if tr is not None:
        full += _truncated(ws, x, at, tr, u, out, thr_all)
    if plain:
        full.append((plain, _FullRows(ws, "plain", x, [at[j] for j in plain], None), None))
    for rows, fr, t in full:
        rows_t = index(rows, dev)
        out[rows_t] = fr.draw(t, u[rows_t])
        if thr_all is not None and t is not None:
            thr_all[rows_t] = t
    return out, thr_all


def _truncated(ws: Workspace, x: torch.Tensor, at: list[int], tr: Truncation, u: torch.Tensor, out: torch.Tensor,
               thr_all: torch.Tensor | None) -> list:
    """The truncating rows' thresholds from their candidates; draws (into out) the rows they decide, and returns
    the others as groups to draw over the whole vocabulary."""
    trunc, kf, pf, mf = tr.pos, tr.top_k, tr.top_p, tr.min_p
    V, dev = x.shape[1], x.device
    n_c = min(V, max(CANDIDATES, tr.max_top_k) + 1)
    complete = n_c == V
    xf = select_rows(ws, "xf", x, [at[j] for j in trunc])
    vals, ids = xf.topk(n_c, dim=-1)  # largest first
    vmax = vals[:, 0]
    kth = vals.gather(1, (kf.clamp(1, n_c) - 1)[:, None])[:, 0]
    thr = torch.where(kf > 0, kth, NEG_INF)  # each row's threshold so far
    # sure: the candidates hold every allowed token, and the thresholds found from them are exact
    sure = torch.ones(len(trunc), dtype=torch.bool, device=dev) if complete else (kf <= 0) | (vals[:, -1] < thr)
    pr = [j for j, p in enumerate(tr.top_p_list) if p < 1]
    nk = [] if complete else [j for j in pr if tr.top_k_list[j] <= 0]
    whole = None
    if pr:
        pr_t = index(pr, dev)
        vp = vals[pr_t]
        wc = (vp - vmax[pr_t, None]).exp_().masked_fill_(vp < thr[pr_t, None], 0.0).double()
        total = row_sum(wc)
        if nk:  # without top-k, the distribution to renormalise is the whole vocabulary's
            whole = _FullRows(ws, "nk", xf, nk, vmax[index(nk, dev)])
            at_pr = {j: n for n, j in enumerate(pr)}
            total[index([at_pr[j] for j in nk], dev)] = row_sum(whole.w).double()
        n_keep = (wc.cumsum(-1) - wc < pf[pr_t, None].double() * total[:, None]).sum(-1).clamp_(min=1)
        thr[pr_t] = torch.maximum(thr[pr_t], vp.gather(1, (n_keep - 1)[:, None])[:, 0])
        if not complete:
            sure[pr_t] &= n_keep < n_c  # the nucleus ended inside the candidates
    log_min_p = torch.where(mf > 0, mf.log(), NEG_INF)
    thr = torch.maximum(thr, vmax + log_min_p)  # p >= min_p * p_max  <=>  x >= x_max + log(min_p)
    if not complete:
        sure &= vals[:, -1] < thr  # the first token left out of the candidates is excluded
    s = sure.nonzero().flatten()
    if len(s):
        rows = index([trunc[j] for j in s.tolist()], dev)
        out[rows] = _draw_candidates(vals[s], ids[s], thr[s], u[rows])
        if thr_all is not None:
            thr_all[rows] = thr[s]
    unsure = (~sure).nonzero().flatten().tolist()
    if not unsure:
        return []
    return _unsure_groups(ws, xf, tr, unsure, nk, whole, kth, vmax, log_min_p)


def _unsure_groups(ws: Workspace, xf: torch.Tensor, tr: Truncation, unsure: list[int], nk: list[int],
                   whole: _FullRows | None, kth: torch.Tensor, vmax: torch.Tensor, log_min_p: torch.Tensor) -> list:
    """Thresholds over the whole vocabulary for the rows the candidates did not decide (the top-k and min-p ones
    are exact already): (their positions among the sampled rows, their _FullRows, their thresholds) per group."""
    dev = xf.device
    full = []
    at_nk = {j: n for n, j in enumerate(nk)}
    for group in ([j for j in unsure if j in at_nk], [j for j in unsure if j not in at_nk]):
        if not group:
            continue
        g = index(group, dev)
        top_k_thr = torch.where(tr.top_k[g] > 0, kth[g], NEG_INF)
        if group[0] in at_nk:
            fr = whole.take([at_nk[j] for j in group])
        else:
            fr = _FullRows(ws, "unsure", xf, group, vmax[g], top_k_thr)
        t = top_k_thr
        gp = [n for n, j in enumerate(group) if tr.top_p_list[j] < 1]
        if gp:
            gp_t = index(gp, dev)
            part = fr if len(gp) == len(group) else fr.take(gp)
            t[gp_t] = torch.maximum(t[gp_t], part.nucleus(tr.top_p[g][gp_t]))
        t = torch.maximum(t, fr.vmax + log_min_p[g])
        full.append(([tr.pos[j] for j in group], fr, t))
    return full
