"""N-gram prompt lookup: the longest suffix (prompt_lookup_min..prompt_lookup_max tokens) of the sequence seen
earlier in the same sequence proposes the tokens that followed it (its most recent earlier occurrence).

Each request keeps an index from n-gram to where it last ended, extended by the tokens added since the last
call, so a lookup costs O(prompt_lookup_max) per new token however long the context grows.
"""
from __future__ import annotations

from tokenloom.spec_decode.proposer import Draft, DraftRequest, Proposer


class _Index:
    __slots__ = ("last_end", "upto")

    def __init__(self):
        self.last_end: dict[tuple[int, ...], int] = {}
        self.upto = 0  # n-grams ending before this position are indexed


class NgramProposer(Proposer):
    cheap = True

    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int = 4, prompt_lookup_min: int = 1):
        super().__init__(num_speculative_tokens)
        self.max_n, self.min_n = prompt_lookup_max, prompt_lookup_min
        self.indexes: dict[str, _Index] = {}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            n, tokens = self.lookup(r.request_id, r.token_ids, r.num_drafts)
            drafts.append(Draft(tokens, kind=n))
        return drafts

    def lookup(self, request_id: str, tokens: list[int], k: int) -> tuple[int, list[int]]:
        """(the matched length, the proposed tokens); (0, []) without a match."""
        index = self.indexes.get(request_id)
        if index is None:
            index = self.indexes[request_id] = _Index()
        last = len(tokens) - 1  # the suffix ends here; index every earlier end first
        table = index.last_end
        for end in range(index.upto, last):
            for n in range(1, min(self.max_n, end + 1) + 1):
                table[tuple(tokens[end - n + 1 : end + 1])] = end
        index.upto = max(index.upto, last)
        if k <= 0 or last < 1:
            return 0, []
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            end = table.get(tuple(tokens[last - n + 1 :]))
            if end is not None:
                # The tokens that followed; a match running into the suffix repeats with its period.
                period = last - end
                return n, [tokens[end + 1 + (j % period)] for j in range(k)]
        return 0, []

    def remove_requests(self, request_ids) -> None:
        for rid in request_ids:
            self.indexes.pop(rid, None)
