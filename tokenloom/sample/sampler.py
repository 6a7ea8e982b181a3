"""Vectorised sampler: one pass over the batch's logits applies each row's own settings with tensor ops.

Order of operations (each row): logits processors (logits_processors.py: logit_bias -> repetition/presence/frequency
penalties -> min_tokens EOS ban -> per-request processors -> grammar bitmask) -> [logprobs are taken here, from this
distribution, before temperature and truncation] -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw
(ops.py). The settings come as one SamplingMetadata per step (metadata.py), tensors on the logits' device.

The draw is an inverse-CDF lookup with one uniform number per sampled row: seeded rows take theirs from their own
generator, the others from the engine's. A row's token therefore depends only on its own logits, settings and
generator, never on what else is in the batch, its order, or which path the truncation took.

With return_probs, SamplerOutput.probs is each row's final distribution, the one its token was drawn from (after
the processors, temperature and truncation; one-hot for greedy rows): what speculative decoding's rejection
sampler needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.kernels.transfer import to_device
from tokenloom.sample import ops
from tokenloom.sample.logits_processors import LogitsProcessor, default_processors
from tokenloom.sample.metadata import SamplingMetadata, SamplingRow, index
from tokenloom.sample.ops import Workspace, select_rows

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "SamplingRow"]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: list of (token_id, logprob) - the chosen token first, then the top-N; None where not asked.
    logprobs: list[list[tuple[int, float]] | None]
    probs: torch.Tensor | None = None  # [rows, V] float32, when asked: the distribution each token was drawn from


class Sampler:
    def __init__(self, generator: torch.Generator, processors: list[LogitsProcessor] | None = None):
        self.generator = generator
        self.processors = default_processors() if processors is None else list(processors)
        self.ws = Workspace()

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata, return_probs: bool = False,
                 choose=None) -> SamplerOutput:
        """Sample one token per row of logits [rows, V] (any float dtype; left as it was). choose(tokens, probs)
        may replace the drawn tokens [rows] before logprobs are taken (speculative decoding's rejection
        sampler), given the distributions they were drawn from (return_probs is implied)."""
        B, V = logits.shape
        active = [p for p in self.processors if p.active(metadata)]
        saved = []
        if logits.dtype != torch.float32 or not all(p.sparse for p in active):
            logits = self.ws("logits", B, V, device=logits.device).copy_(logits)
        else:  # the caller's tensor: edited in place (sparse), and put back as it was before returning
            saved = [(index, logits[index]) for index in (p.touched(metadata) for p in active)]
        try:
            for p in active:
                p.apply(logits, metadata)
            return self._run(logits, metadata, return_probs or choose is not None, choose)
        finally:
            for index, values in reversed(saved):
                logits.index_put_(index, values)

    def _run(self, logits: torch.Tensor, md: SamplingMetadata, return_probs: bool, choose=None) -> SamplerOutput:
        B, V = logits.shape
        ws = self.ws
        tokens = torch.empty(B, dtype=torch.long, device=logits.device)
        if md.greedy:  # max(dim).indices: the first maximum, like argmax, and faster on CPU
            tokens[md.greedy_index] = select_rows(ws, "greedy", logits, md.greedy).max(-1).indices
        x = at = thr = None
        if md.sampled:
            if 4 * len(md.greedy) <= B:  # scale every row (greedy ones by 1): cheaper than copying the others out
                x = torch.div(logits, md.temperature[:, None], out=ws("x", B, V, device=logits.device))
                at = md.sampled
            else:
                x = select_rows(ws, "x", logits, md.sampled).div_(md.sampled_temperature[:, None])
                at = list(range(len(md.sampled)))
            drawn, thr = ops.sample(ws, x, at, md.truncation, md.plain, self._uniforms(md), return_probs)
            tokens[md.sampled_index] = drawn
        probs = self._probs(md, tokens, x, at, thr, V) if return_probs else None
        if choose is not None:
            tokens = choose(tokens, probs)
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(logits, md, tokens, token_list), probs)

    def _uniforms(self, md: SamplingMetadata) -> torch.Tensor:
        """One uniform number per sampled row: seeded rows from their own generator, the others from the engine's
        (each drawn on its generator's device, gathered on the host, then moved to the logits' in one copy)."""
        n, dev, g = len(md.sampled), md.device, self.generator
        if not md.seeded:
            return to_device(torch.rand(n, generator=g, device=g.device).cpu(), dev)
        u = torch.empty(n, device="cpu")  # filled on the host, then one copy
        if md.unseeded:
            u[index(md.unseeded, u.device)] = torch.rand(len(md.unseeded), generator=g, device=g.device).cpu()
        for j, gen in md.seeded:
            u[j] = torch.rand(1, generator=gen, device=gen.device)[0]
        return to_device(u, dev)

    @staticmethod
    def _probs(md: SamplingMetadata, tokens: torch.Tensor, x: torch.Tensor | None, at: list[int] | None,
               thr: torch.Tensor | None, V: int) -> torch.Tensor:
        """[rows, V] float32: each sampled row's softmax over its support (x >= its threshold), one-hot rows for
        the greedy ones."""
        probs = torch.zeros(md.num_rows, V, dtype=torch.float32, device=tokens.device)
        if md.greedy:
            probs[md.greedy_index, tokens[md.greedy_index]] = 1.0
        if md.sampled:
            xs = x[index(at, x.device)]
            neg = xs - xs.amax(-1, keepdim=True)
            w = ops.exp_nonpositive(neg, neg).masked_fill_(xs < thr[:, None], 0.0)
            probs[md.sampled_index] = w / ops.row_sum(w)[:, None]
        return probs

    def _logprobs(self, logits: torch.Tensor, md: SamplingMetadata, tokens: torch.Tensor,
                  token_list: list[int]) -> list:
        """Per row that asked: the chosen token's logprob, then the top-N, from the processed logits."""
        out: list = [None] * md.num_rows
        rows = md.logprob_rows
        if not rows:
            return out
        V = logits.shape[1]
        rows_t = index(rows, logits.device)
        lp = select_rows(self.ws, "lp", logits, rows)
        m = lp.amax(-1, keepdim=True)
        exp = torch.sub(lp, m, out=self.ws("lp.exp", len(rows), V, device=logits.device))
        exp = ops.exp_nonpositive(exp, exp)
        lse = m + ops.row_sum(exp)[:, None].log_()
        chosen = ops.reportable_logprobs(lp.gather(1, tokens[rows_t][:, None]) - lse)[:, 0].tolist()
        top_n = max(md.num_logprobs)
        if top_n:
            top_vals, top_ids = lp.topk(top_n, dim=-1)
            top_vals, top_ids = ops.reportable_logprobs(top_vals - lse).tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            entry = [(token_list[i], chosen[j])]
            n = md.num_logprobs[j]
            if n:
                entry += list(zip(top_ids[j][:n], top_vals[j][:n]))
            out[i] = entry
        return out
