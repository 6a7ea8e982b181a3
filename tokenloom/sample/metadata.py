"""The batch's sampling settings as tensors on the logits' device, built once per step (vLLM v1's SamplingMetadata).

The model runner hands over one `SamplingRow` per row to sample; `SamplingMetadata.from_rows(rows, device)` turns
them into what the sampler and the logits processors work with: per-row tensors (temperature, top-k, top-p, min-p,
penalties), the sparse edits as index tensors (logit bias, penalised token histories, the min_tokens bans), and the
host-side facts that decide which path a row takes (greedy or sampled, truncated or not, seeded or not). Every tensor
lives on `device`; nothing is built from the logits, so the metadata can be made before the forward pass ends.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokenloom.kernels.transfer import to_device
from tokenloom.sampling_params import SAMPLING_EPS, SamplingParams

# A per-request logits processor (vLLM v0's signature): (the request's output token ids, its logits row [V]) ->
# the new row (it may edit the given one in place and return it).
RequestLogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingRow:
    """What the model runner hands over for one row to sample."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # seeded requests; None draws from the engine's generator
    eos_token_ids: tuple[int, ...] = ()
    logits_processors: tuple[RequestLogitsProcessor, ...] = ()


def _tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values made a tensor on the host, then put on `device` (on CUDA without waiting for the forward pass)."""
    return to_device(torch.tensor(values, dtype=dtype, device="cpu"), device)


def index(ids: list[int], device: torch.device) -> torch.Tensor:
    """Row or column ids as a long tensor on `device` (the sampler's gathers and scatters)."""
    return _tensor(ids, torch.long, device)


def penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0


@dataclass
class Penalties:
    """The rows with a penalty and a history: only the logits of tokens a row has seen are touched."""

    rows: torch.Tensor  # [P, 1] long: their batch rows
    tokens: torch.Tensor  # [P, W] long: prompt + output tokens, padded with the row's first token (a harmless repeat)
    repetition: torch.Tensor  # [P, 1] float32
    presence: torch.Tensor  # [P, 1] float32
    frequency: torch.Tensor  # [P, 1] float32
    counts: torch.Tensor | None  # [P, W] float32: how often each entry's token was generated; None: no row needs it

    @classmethod
    def from_rows(cls, rows: list[SamplingRow], device: torch.device) -> Penalties | None:
        idx = [i for i, r in enumerate(rows) if penalised(r.params) and (r.prompt_token_ids or r.output_token_ids)]
        if not idx:
            return None
        seen = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in idx]
        width = max(len(s) for s in seen)
        tokens = _tensor([s + [s[0]] * (width - len(s)) for s in seen], torch.long, device)
        params = [rows[i].params for i in idx]

        def column(values):
            return _tensor(values, torch.float32, device)[:, None]

        counts = None
        if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
            # Count each entry's token in the row's sorted output (padded with -1, never a token).
            outs = [rows[i].output_token_ids for i in idx]
            out_w = max(1, max(len(o) for o in outs))
            out = _tensor([o + [-1] * (out_w - len(o)) for o in outs], torch.long, device)
            out = out.sort(-1).values
            counts = (torch.searchsorted(out, tokens, right=True) - torch.searchsorted(out, tokens)).float()
        return cls(index(idx, device)[:, None], tokens, column([p.repetition_penalty for p in params]),
                   column([p.presence_penalty for p in params]), column([p.frequency_penalty for p in params]), counts)


@dataclass
class Truncation:
    """The sampled rows that truncate (top-k, top-p or min-p), as positions among the sampled rows."""

    pos: list[int]
    top_k: torch.Tensor  # [T] long, <= 0: off
    top_p: torch.Tensor  # [T] float32, 1: off
    min_p: torch.Tensor  # [T] float32, 0: off
    top_k_list: list[int]  # host copies, for the choices of path
    top_p_list: list[float]

    @property
    def max_top_k(self) -> int:
        return max(self.top_k_list)


@dataclass
class SamplingMetadata:
    num_rows: int
    device: torch.device
    greedy: list[int]  # batch rows decided by argmax (temperature < SAMPLING_EPS)
    sampled: list[int]  # batch rows drawn at random
    greedy_index: torch.Tensor | None  # the same, as index tensors (None when empty)
    sampled_index: torch.Tensor | None
    temperature: torch.Tensor  # [rows] float32 (1 for greedy rows)
    sampled_temperature: torch.Tensor  # [sampled] float32
    truncation: Truncation | None  # None: no sampled row truncates
    plain: list[int]  # positions among the sampled rows drawn from the whole distribution
    unseeded: list[int]  # positions among the sampled rows that draw from the engine's generator
    seeded: list[tuple[int, torch.Generator]]  # (position among the sampled rows, its own generator)
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    penalties: Penalties | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids): EOS and stop ids before min_tokens
    logprob_rows: list[int]  # rows that asked for logprobs, and how many top ones each
    num_logprobs: list[int]
    # (row, its output token ids, its processors), for rows with per-request logits processors
    request_processors: list[tuple[int, list[int], tuple[RequestLogitsProcessor, ...]]] = field(default_factory=list)
    token_bitmask: torch.Tensor | None = None  # [rows or len(bitmask_rows), ceil(V / 32)] int32, bit set = allowed
    bitmask_rows: torch.Tensor | None = None  # the batch rows token_bitmask's rows apply to; None: all, in order

    @property
    def all_greedy(self) -> bool:
        return not self.sampled

    @property
    def all_random(self) -> bool:
        return not self.greedy

    @property
    def greedy_mask(self) -> torch.Tensor:
        """[rows] bool, True for the greedy rows (made on demand; the sampler uses the index lists)."""
        mask = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        return mask if self.greedy_index is None else mask.index_fill_(0, self.greedy_index, True)

    @classmethod
    def from_rows(cls, rows: list[SamplingRow], device: torch.device | str, token_bitmask: torch.Tensor | None = None,
                  bitmask_rows: list[int] | None = None) -> SamplingMetadata:
        """The batch's metadata on `device`. token_bitmask: a structured-output grammar's packed mask (xgrammar's
        layout), for every row or for the rows in bitmask_rows."""
        device = torch.device(device)
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < SAMPLING_EPS]
        sampled = [i for i, r in enumerate(rows) if r.params.temperature >= SAMPLING_EPS]
        temps = [r.params.temperature if r.params.temperature >= SAMPLING_EPS else 1.0 for r in rows]
        gens = [rows[i].generator for i in sampled]
        plain, truncation = _truncation([rows[i].params for i in sampled], device)
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        return cls(
            num_rows=len(rows), device=device, greedy=greedy, sampled=sampled,
            greedy_index=index(greedy, device) if greedy else None,
            sampled_index=index(sampled, device) if sampled else None,
            temperature=_tensor(temps, torch.float32, device),
            sampled_temperature=_tensor([temps[i] for i in sampled], torch.float32, device),
            truncation=truncation, plain=plain,
            unseeded=[j for j, g in enumerate(gens) if g is None],
            seeded=[(j, g) for j, g in enumerate(gens) if g is not None],
            logit_bias=_logit_bias(rows, device), penalties=Penalties.from_rows(rows, device),
            banned=_banned(rows, device), logprob_rows=lp_rows, num_logprobs=[rows[i].params.logprobs for i in lp_rows],
            request_processors=[(i, r.output_token_ids, r.logits_processors) for i, r in enumerate(rows)
                                if r.logits_processors],
            token_bitmask=None if token_bitmask is None else to_device(token_bitmask, device),
            bitmask_rows=None if bitmask_rows is None else index(bitmask_rows, device),
        )


def _truncation(params: list[SamplingParams], device: torch.device) -> tuple[list[int], Truncation | None]:
    """(positions of the rows without truncation, the truncating rows' settings)."""
    cut = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1 or p.min_p > 0]
    plain = [j for j, p in enumerate(params) if not (p.top_k > 0 or p.top_p < 1 or p.min_p > 0)]
    if not cut:
        return plain, None
    ks = [params[j].top_k for j in cut]
    ps = [params[j].top_p for j in cut]
    return plain, Truncation(
        cut, _tensor(ks, torch.long, device), _tensor(ps, torch.float32, device),
        _tensor([params[j].min_p for j in cut], torch.float32, device), ks, ps)


def _logit_bias(rows: list[SamplingRow], device: torch.device):
    r_, c_, v_ = [], [], []
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            r_ += [i] * len(r.params.logit_bias)
            c_ += r.params.logit_bias.keys()
            v_ += r.params.logit_bias.values()
    if not r_:
        return None
    return index(r_, device), index(c_, device), _tensor(v_, torch.float32, device)


def _banned(rows: list[SamplingRow], device: torch.device):
    r_, c_ = [], []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) < r.params.min_tokens:
            ban = list(r.eos_token_ids) + list(r.params.stop_token_ids or ())
            r_ += [i] * len(ban)
            c_ += ban
    return (index(r_, device), index(c_, device)) if r_ else None
