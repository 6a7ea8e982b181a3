"""What the worker hands back to the scheduler after a step (the other half of the contract with core/)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelRunnerOutput:
    # The scheduled requests that produced tokens this step, each as the scheduler handed it over (a fork of an
    # n > 1 request draws its first token from its parent's row).
    requests: list = field(default_factory=list)
    # Per such request, the tokens it keeps: the draft tokens that were accepted, then one sampled token.
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    # Per such request and kept token: [(token, logprob), (top token, logprob), ...], or None when not asked.
    logprobs: list[list | None] = field(default_factory=list)
    # Per such request, draft tokens to verify next step (speculative decoding; empty when not speculating).
    spec_token_ids: list[list[int]] = field(default_factory=list)
    # Prompt logprobs computed this step: (request, first prompt position, [{token: logprob}, ...]).
    prompt_logprobs: list[tuple[object, int, list[dict]]] = field(default_factory=list)
