"""Vectorised sampler: one pass over the batch's logits applies each row's own settings with tensor ops.

Order of operations (each row): logit_bias -> repetition/presence/frequency penalties -> min_tokens EOS ban ->
[logprobs are taken here from the raw model distribution] -> greedy argmax, or temperature -> top-k -> top-p
-> min-p -> draw. Seeded rows draw from their own generator, so their result does not depend on the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.sampling_params import SamplingParams


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
    """Repetition (transformers/CTRL: over prompt and output), presence and frequency (OpenAI: over output)."""
    idx = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0
           or r.params.presence_penalty or r.params.frequency_penalty]
    if not idx:
        return logits
    B, V = len(idx), logits.shape[1]
    sub = logits[idx]
    out_tok = _pad([rows[i].output_token_ids for i in idx], V)
    counts = torch.zeros(B, V + 1).scatter_add_(1, out_tok, torch.ones_like(out_tok, dtype=torch.float32))[:, :V]
    prompt_tok = _pad([rows[i].prompt_token_ids for i in idx], V)
    seen = torch.zeros(B, V + 1, dtype=torch.bool).scatter_(1, prompt_tok, True)[:, :V] | (counts > 0)
    rep = torch.tensor([rows[i].params.repetition_penalty for i in idx])[:, None]
    pres = torch.tensor([rows[i].params.presence_penalty for i in idx])[:, None]
    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx])[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).float()
    logits[idx] = sub
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / top-p nucleus / min-p floor. logits are temperature-scaled."""
    V = logits.shape[1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        floor = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        B, V = logits.shape
        for i, r in enumerate(rows):  # sparse per-row edits: a handful of ids each
            p = r.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()))
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()))
            if len(r.output_token_ids) < p.min_tokens:
                ban = list(r.eos_token_ids) + list(p.stop_token_ids)
                if ban:
                    logits[i, ban] = float("-inf")
        logits = apply_penalties(logits, rows)

        want_logprobs = [r.params.logprobs is not None for r in rows]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        greedy = torch.tensor([r.params.temperature == 0 for r in rows])
        tokens = logits.argmax(-1)
        sampled_rows = (~greedy).nonzero().flatten().tolist()
        if sampled_rows:
            sub_rows = [rows[i] for i in sampled_rows]
            temp = torch.tensor([r.params.temperature for r in sub_rows])[:, None]
            scaled = filter_logits(
                logits[sampled_rows] / temp,
                torch.tensor([r.params.top_k for r in sub_rows]),
                torch.tensor([r.params.top_p for r in sub_rows]),
                torch.tensor([r.params.min_p for r in sub_rows]),
            )
            probs = scaled.softmax(-1)
            drawn = self._draw(probs, [r.generator for r in sub_rows])
            tokens[sampled_rows] = drawn

        token_list = tokens.tolist()
        out_logprobs: list = [None] * B
        if logprobs is not None:
            rows_lp = [i for i in range(B) if want_logprobs[i]]
            top_n = max(rows[i].params.logprobs for i in rows_lp)
            chosen = logprobs[rows_lp, tokens[rows_lp]].tolist()
            top_vals, top_ids = (logprobs[rows_lp].topk(top_n, dim=-1) if top_n else (None, None))
            for j, i in enumerate(rows_lp):
                entry = [(token_list[i], chosen[j])]
                n = rows[i].params.logprobs
                if n:
                    entry += list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
                out_logprobs[i] = entry
        return SamplerOutput(token_list, out_logprobs)

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        out = torch.empty(probs.shape[0], dtype=torch.long)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            out[unseeded] = torch.multinomial(probs[unseeded], 1, generator=self.generator).flatten()
        for i, g in enumerate(generators):
            if g is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
        return out
