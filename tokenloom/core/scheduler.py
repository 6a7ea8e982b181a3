"""Continuous-batching scheduler in the vLLM v1 style.

Every request carries num_computed_tokens, which catches up with its token count. Each step packs, under a
token budget, one token (plus its draft tokens, when a proposer made some) for every decoding request and prefill
chunks for the rest, running requests first (FCFS), then waiting ones. When KV blocks run out, the most recently
admitted request is preempted: its blocks are freed and it is recomputed later (cheaply, when its blocks are still
in the prefix cache).

`schedule()` decides what runs; `update_from_output()` is the only place where sampled tokens are accepted: it
advances num_computed_tokens, rolls back rejected draft tokens, attaches the forks of n > 1 requests, appends the
kept tokens and finishes requests that hit a token-level stop (EOS, stop token ids, max_tokens, the context).
"""
from __future__ import annotations

import logging
from collections import deque

from tokenloom.config import SchedulerConfig
from tokenloom.core.kv_cache_manager import KVCacheManager
from tokenloom.core.request import Request, RequestStatus
from tokenloom.core.scheduler_output import GrammarOutput, ScheduledRequest, SchedulerOutput
from tokenloom.worker.outputs import ModelRunnerOutput

log = logging.getLogger("tokenloom")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = (), num_lookahead_tokens: int = 0, structured_output=None,
                 max_loras: int = 0):
        self.config = config
        # LoRA: the running requests use at most this many adapters (the worker's slots); a waiting request of
        # another adapter waits, and requests behind it may go first
        self.max_loras = max_loras
        self.structured_output = structured_output  # structured_output.StructuredOutputManager, or None
        # A draft model writes the K/V of its drafts after a step, ahead of the request's tokens: every request
        # that catches up in a step keeps this many slots beyond it.
        self.num_lookahead_tokens = num_lookahead_tokens
        # finished or preempted since the last schedule(): their blocks are gone, the worker drops its state of them
        self.freed_request_ids: list[str] = []
        self.kv_cache_manager = kv_cache_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_reused_tokens = 0  # prompt tokens served from the prefix cache instead of computed
        self.num_draft_tokens = 0  # speculative tokens verified
        self.num_accepted_tokens = 0  # of which accepted
        self.num_spec_steps = 0  # verify runs (requests with drafts, per step)
        # Prefill/decode disaggregation (engine.kv_connector): K/V of requests computed elsewhere, loaded into their
        # blocks at admission (vLLM's KV connector: "how many tokens are already external?"), and exported from
        # requests that finish here. None: every token is computed here.
        self.kv_connector = None

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- schedule ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(freed_request_ids=self.freed_request_ids)
        self.freed_request_ids = []
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.num_preempted:  # a step that had to preempt admits nobody
            self._schedule_waiting(out, budget)
        out.grammar = self._grammar_bitmask(out)
        out.num_waiting = len(self.waiting)
        return out

    def _grammar_bitmask(self, out: SchedulerOutput) -> GrammarOutput | None:
        """Start filling the mask of every position a constrained request samples this step: its next token,
        and after each of its drafts (the drafts before it taken as output)."""
        rows: dict[str, int] = {}
        entries, num_rows = [], 0
        for item in out.scheduled:
            req = item.request
            if req.num_computed_tokens + item.num_tokens - len(item.spec_token_ids) != req.num_tokens:
                continue  # a prefill chunk that samples nothing
            for r in [req, *req.forks]:  # forks of n > 1 draw their first token in their parent's step
                if r.grammar is not None:
                    drafts = item.spec_token_ids if r is req else []
                    rows[r.request_id] = num_rows
                    entries.append((r.grammar, num_rows, drafts))
                    num_rows += 1 + len(drafts)
        if not entries:
            return None
        return GrammarOutput(rows, self.structured_output.start_bitmask(num_rows, entries))

    def _num_drafts(self, req: Request, budget: int) -> int:
        """Draft tokens to verify with the request's next token: within the budget, the context and max_tokens."""
        if not req.spec_token_ids or req.num_computed_tokens != req.num_tokens - 1:
            return 0
        room = min(budget - 1, self.max_model_len - req.num_tokens - 1, req.max_tokens - len(req.output_token_ids) - 1)
        return max(0, min(len(req.spec_token_ids), room))

    def _lookahead(self, req: Request, num_after: int, num_drafts: int) -> int:
        """Slots beyond the request's next tokens: its drafts', and, when this step catches it up
        (num_after tokens with the drafts), the draft model's for its next drafts."""
        if not self.num_lookahead_tokens or num_after - num_drafts < req.num_tokens:
            return num_drafts
        return num_drafts + max(0, min(self.num_lookahead_tokens, self.max_model_len - num_after))

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Decodes and unfinished prefill chunks of running requests; preempts from the back when blocks run out."""
        kv = self.kv_cache_manager
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            k = self._num_drafts(req, budget)
            n = min(self._chunk_end(req, req.num_computed_tokens) - req.num_computed_tokens, budget - k)
            ahead = self._lookahead(req, req.num_computed_tokens + n + k, k)
            copies = kv.allocate_slots(req, n, num_lookahead_tokens=ahead)
            while copies is None:  # out of blocks: preempt from the back until this request fits
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
                copies = kv.allocate_slots(req, n, num_lookahead_tokens=ahead)
            if copies is None:
                break
            out.scheduled.append(ScheduledRequest(req, n + k, req.spec_token_ids[:k]))
            out.blocks_to_copy += copies
            budget -= n + k
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting requests, in arrival order, while there is room; prefix-cache hits are adopted first. A request
        whose adapter would be one too many for the LoRA slots is passed over (it keeps its place)."""
        kv = self.kv_cache_manager
        loras = {r.lora_int_id for r in self.running} - {0}
        passed: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.lora_int_id and req.lora_int_id not in loras and len(loras) >= self.max_loras:
                passed.append(self.waiting.popleft())
                continue
            # Prompt logprobs need every prompt position computed, so such requests skip the prefix cache.
            wants_all = req.params.prompt_logprobs is not None
            cached = kv.find_cached_prefix(req) if req.num_computed_tokens == 0 and not wants_all else []
            num_cached = len(cached) * kv.block_size
            external = self.kv_connector.num_external_tokens(req, num_cached) if req.kv_transfer is not None else 0
            n = min(self._chunk_end(req, num_cached + external) - num_cached - external, budget)
            req.num_computed_tokens = num_cached + external
            if kv.allocate(req, req.num_computed_tokens + n + self._lookahead(req, req.num_computed_tokens + n, 0),
                           cached) is None:
                req.num_computed_tokens = 0
                break
            if external and not self.kv_connector.load(req, len(cached)):  # the transfer failed: compute it here
                req.num_computed_tokens = num_cached
                n = min(self._chunk_end(req, num_cached) - num_cached, budget)
            if req.lora_int_id:
                loras.add(req.lora_int_id)
            req.num_cached_tokens = num_cached
            self.num_reused_tokens += num_cached
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        self.waiting.extendleft(reversed(passed))

    @staticmethod
    def _chunk_end(req: Request, num_computed: int) -> int:
        """Where a chunk starting at num_computed may end: the request's last token, but the prompt's last for a
        request whose first token was sampled elsewhere (disaggregated prefill) while it computes its own prompt
        (a failed transfer, a preemption), so its first token runs as a decode, as it would have here."""
        if req.kv_transfer is not None and num_computed < req.num_prompt_tokens:
            return req.num_prompt_tokens
        return req.num_tokens

    def _preempt(self, req: Request) -> None:
        self.kv_cache_manager.free_request(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        self.freed_request_ids.append(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- update --------------------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[tuple[Request, int]]:
        """Accept the step's results. Returns (request, number of tokens it gained) for every request that
        gained tokens, in the runner's order (finished ones included; aborted ones left out)."""
        if sched.grammar is not None:
            sched.grammar.bitmask()  # the matchers are the mask thread's until it is done
        kept = {id(req): tokens for req, tokens in zip(out.requests, out.sampled_token_ids)}
        for item in sched.scheduled:
            req, num_drafts = item.request, len(item.spec_token_ids)
            req.num_computed_tokens += item.num_tokens
            if num_drafts and id(req) in kept:
                accepted = len(kept[id(req)]) - 1
                req.num_computed_tokens -= num_drafts - accepted  # roll back the rejected drafts' K/V
                self.num_draft_tokens += num_drafts
                self.num_accepted_tokens += accepted
                self.num_spec_steps += 1
            req.spec_token_ids = []
            self.kv_cache_manager.cache_full_blocks(req)  # of known tokens: accepted drafts once appended
        for req in out.requests:  # attach forks before any parent can finish and free the shared blocks
            if req.fork_of is not None and req.status == RequestStatus.WAITING:
                self._attach_fork(req)
        gained = []
        drafts = out.spec_token_ids or [[]] * len(out.requests)
        for req, tokens, logprobs, spec in zip(out.requests, out.sampled_token_ids, out.logprobs, drafts):
            req.forks = []
            if req.is_finished:  # aborted while in flight
                continue
            n = self._append_tokens(req, tokens, logprobs)
            if not req.is_finished:
                req.spec_token_ids = spec
                self.kv_cache_manager.cache_full_blocks(req)
            gained.append((req, n))
        return gained

    def _append_tokens(self, req: Request, tokens: list[int], logprobs: list | None) -> int:
        """Append kept tokens up to (and including) the first that stops the request; returns how many."""
        for i, token in enumerate(tokens):
            req.output_token_ids.append(token)
            if logprobs is not None:
                req.logprobs.append(dict(logprobs[i]))
            reason, stop = self._token_stop(req, token)
            if reason is None and req.grammar is not None:
                reason = self._advance_grammar(req, token)
            if reason is not None:
                req.finish_reason, req.stop_reason = reason, stop
                self.kv_cache_manager.cache_full_blocks(req)  # its last full blocks stay reusable
                self.finish(req)
                return i + 1
        return len(tokens)

    def _advance_grammar(self, req: Request, token: int) -> str | None:
        """Advance a constrained request's matcher over an accepted token: "stop" when the grammar is complete
        (nothing but EOS could follow) or failed (logged), else None. EOS (drawn with ignore_eos, where the
        grammar may end) ends it too."""
        if token in self.eos_token_ids:
            return "stop"
        ok = req.grammar.accept_tokens([token])
        if ok and not req.grammar.is_terminated():
            return None
        if not ok:
            log.warning("request %s: the grammar refused a token (%s)", req.request_id, req.grammar.error())
        return "stop"

    def _token_stop(self, req: Request, token: int) -> tuple[str | None, int | None]:
        p = req.params
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if n_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _attach_fork(self, child: Request) -> None:
        parent = child.fork_of
        self.kv_cache_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.kv_transfer is not None:  # export its K/V before its blocks go, or drop a transfer not loaded yet
            self.kv_connector.request_finished(req)
        self.kv_cache_manager.free_request(req)
        if req.status != RequestStatus.FINISHED:
            self.freed_request_ids.append(req.request_id)
        req.status = RequestStatus.FINISHED
