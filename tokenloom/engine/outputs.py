"""What the engine returns: per user request, its completions so far, metrics, and engine-wide statistics."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, chosen token first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the chosen tokens' logprobs (None without logprobs)."""
        if self.logprobs is None:
            return None
        return sum(entry.get(t, 0.0) for t, entry in zip(self.token_ids, self.logprobs))

    @property
    def mean_logprob(self) -> float | None:
        """The chosen tokens' mean logprob: what best_of ranks by (OpenAI's "highest log probability per token");
        None without logprobs, -inf for an empty completion."""
        total = self.cumulative_logprob
        if total is None:
            return None
        return total / len(self.token_ids) if self.token_ids else float("-inf")


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # best_of: every candidate generated, in index order (outputs holds the n best of them, best first)
    candidates: list[CompletionOutput] | None = None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Output tokens after the first, over the time they took (per completion, averaged)."""
        m = self.metrics
        n = max(len(o.token_ids) for o in self.outputs)
        if m.first_token_time is None or m.finished_time is None or n < 2:
            return None
        return (n - 1) / max(m.finished_time - m.first_token_time, 1e-9)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    prompt_tokens_computed: int
    prompt_tokens_reused: int
    tokens_computed: int
    num_preemptions: int
    kv_waste_paged: float  # step-averaged share of allocated KV slots holding no token
    kv_waste_contiguous: float  # same, had each request reserved its maximum length up front
    steps: int
    # speculative decoding: drafts verified, of which accepted, in how many verify runs
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_runs: int = 0
    grammar_compiles: int = 0  # structured output: constraints compiled so far
    grammar_compile_seconds: float = 0.0  # their total compile time
    grammar_mask_steps: int = 0  # steps that filled a grammar bitmask
    grammar_mask_seconds: float = 0.0  # total time filling them (alongside the forward passes)
    kv_cache_bytes: int = 0  # the KV pool's size (address space reserved)
    kv_resident_bytes: int = 0  # of which written since last returned to the OS (blocks in use or kept)
    kv_released_bytes: int = 0  # returned to the OS so far
    extra: dict = field(default_factory=dict)

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verify run yields: its accepted drafts plus the one sampled token (1 = no gain)."""
        return 1 + self.spec_accepted_tokens / self.spec_verify_runs if self.spec_verify_runs else 0.0
