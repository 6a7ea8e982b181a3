"""The proposer interface of speculative decoding: what a proposer is given and what it hands back."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


def common_prefix(a, b) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class DraftRequest:
    """One request to draft for, as the model runner sees it after a step."""

    request_id: str
    token_ids: list[int]  # every accepted token: the prompt, the output, and this step's kept tokens
    num_drafts: int  # how many tokens to propose (at most)
    params: object = None  # the request's SamplingParams (a model draft samples as the request does)
    block_table: list[int] = field(default_factory=list)  # the target's blocks, lookahead slots included
    generator: torch.Generator | None = None  # a seeded request's own generator


@dataclass
class Draft:
    token_ids: list[int]
    # [len(token_ids), vocab] float32: the distribution q each draft token was drawn from; None: q is one-hot on
    # the drafted tokens (n-gram lookups, greedy drafts), verified by equality with the target's own draw.
    probs: torch.Tensor | None = None
    # What kind of guess this is (an n-gram lookup: the matched length), so acceptance is learnt per kind.
    kind: int = 0


class Proposer(abc.ABC):
    """Given requests that just gained tokens, propose up to `num_drafts` draft tokens for each.

    Drafts are only guesses: a wrong one costs a little compute, never a different output, because verification
    keeps the target model's distribution exactly.
    """

    # Proposals cost next to nothing: adaptive k keeps scoring them while speculation is paused.
    cheap = False
    # Draft K/V written into the target's lookahead slots (the scheduler reserves num_speculative_tokens of them).
    needs_lookahead_slots = False

    def __init__(self, num_speculative_tokens: int):
        if num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        self.num_speculative_tokens = num_speculative_tokens

    @abc.abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One Draft per request, in the order given (possibly empty)."""

    def remove_requests(self, request_ids) -> None:
        """Forget per-request state of finished requests."""
