"""The proposer interface of speculative decoding."""
from __future__ import annotations

import abc
from typing import Protocol, Sequence


class DraftContext(Protocol):
    """What a proposer may read of a request (core.Request satisfies it)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def all_token_ids(self) -> list[int]: ...


class Proposer(abc.ABC):
    """Given the running requests, propose up to `num_speculative_tokens` draft tokens for each.

    Drafts are only guesses: a wrong one costs a little compute, never a different output, because verification
    keeps the target model's distribution exactly. A proposer may return fewer tokens (or none) for a request.
    """

    def __init__(self, num_speculative_tokens: int):
        if num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        self.num_speculative_tokens = num_speculative_tokens

    @abc.abstractmethod
    def propose(self, requests: Sequence[DraftContext]) -> list[list[int]]:
        """Draft token ids per request, in the order given."""

    def draft_probs(self) -> list | None:
        """The draft distributions q of the last proposal, for rejection sampling; None means q is one-hot on the
        drafted tokens (n-gram lookups and greedy drafts)."""
        return None

    def remove_requests(self, request_ids: Sequence[str]) -> None:
        """Forget per-request state (a draft model's KV cache, for instance) of finished requests."""
