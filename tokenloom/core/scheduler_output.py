"""The scheduler's output: everything the worker needs to run one step, and nothing it may change."""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenloom.core.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens whose K/V this step computes, from request.num_computed_tokens on
    # Draft tokens verified this step: the last num_spec_tokens of the num_tokens (their K/V is computed too, and
    # rolled back for the ones rejected).
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass
class GrammarOutput:
    """The step's structured-output mask: request id -> its first row in the bitmask, one row per position the
    request samples this step (its next token, after each of its drafts); the bitmask is filled in the background
    while the forward pass runs."""
    rows: dict[str, int]
    job: object  # a concurrent.futures.Future of the [rows, ceil(V / 32)] int32 mask

    def bitmask(self):
        return self.job.result()


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the step runs
    num_preempted: int = 0
    freed_request_ids: list[str] = field(default_factory=list)  # finished or preempted: drop their state
    grammar: GrammarOutput | None = None  # constrained requests' token bitmask (None: nothing constrained)
    num_waiting: int = 0  # requests left waiting for a slot after this step's admissions

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_spec_tokens(self) -> int:
        return sum(len(s.spec_token_ids) for s in self.scheduled)
