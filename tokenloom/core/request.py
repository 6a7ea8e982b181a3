"""A request as the engine tracks it: its tokens, how many have been computed, and its KV blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenloom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: a request is itself, not its field values
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context window
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    # The one counter of the scheduler: tokens whose K/V are in the cache. It catches up with num_tokens
    # through prefill chunks, prefix-cache hits and decodes alike.
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # tokens served from the prefix cache at first schedule
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    group_id: str = ""  # the user request this completion belongs to
    fork_of: "Request | None" = None  # n > 1: shares the parent's prompt blocks once the parent is prefilled
    forks: list["Request"] = field(default_factory=list)  # children waiting for this request's prefill
    # Draft tokens a proposer guessed to follow the output; verified (and accepted or rolled back) next step.
    spec_token_ids: list[int] = field(default_factory=list)
    # structured_output.GrammarMatcher of a constrained request: advanced over every token the scheduler accepts
    grammar: object = None
    first_token_time: float | None = None
    logprobs: list = field(default_factory=list)  # per output token: {token_id: logprob}
    generator: object = None  # torch.Generator for seeded requests
    detokenizer: object = None
    text: str = ""
    index: int = 0  # completion index within its prompt's n
    lora_request: object = None  # lora.LoRARequest of the adapter it runs with (None: the base model)
    # Seeds the chain of its prefix-cache block hashes: one per adapter, so adapters never share blocks
    lora_hash_seed: object = None
    # Prefill/decode disaggregation: the K/V hand-off this request takes part in (engine.kv_connector), or None
    kv_transfer: object = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
