"""Continuous-batching scheduler in the vLLM v1 style.

Every request carries num_computed_tokens, which catches up with its token count. Each step packs, under a
token budget, one token for every decoding request and prefill chunks for the rest, running requests first
(FCFS), then waiting ones. When KV blocks run out, the most recently admitted request is preempted: its blocks
are freed and it is recomputed later (cheaply, when its blocks are still in the prefix cache).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenloom.config import SchedulerConfig
from tokenloom.core.block_pool import BlockManager
from tokenloom.core.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute now)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_reused_tokens = 0  # prompt tokens served from the prefix cache instead of computed

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running requests: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            copies = bm.allocate(req, req.num_computed_tokens + n)
            while copies is None:  # out of blocks: preempt from the back until this request fits
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
                copies = bm.allocate(req, req.num_computed_tokens + n)
            if copies is None:
                break
            out.scheduled.append((req, n))
            out.blocks_to_copy += copies
            budget -= n
            i += 1

        # 2. Waiting requests, in arrival order, while there is room (not in a step that had to preempt).
        while self.waiting and budget > 0 and not out.num_preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            # Prompt logprobs need every prompt position computed, so such requests skip the prefix cache.
            wants_all = req.params.prompt_logprobs is not None
            cached = bm.find_cached_prefix(req) if req.num_computed_tokens == 0 and not wants_all else []
            num_cached = len(cached) * bm.block_size
            n = min(req.num_tokens - num_cached, budget)
            req.num_computed_tokens = num_cached
            if bm.allocate(req, num_cached + n, cached) is None:
                req.num_computed_tokens = 0
                break
            req.num_cached_tokens = num_cached
            self.num_reused_tokens += num_cached
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free_request(req)
        req.status = RequestStatus.FINISHED
