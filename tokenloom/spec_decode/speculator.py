"""The model runner's side of speculative decoding: after each step it learns from the verified drafts, plans how
many drafts each request gets (adaptive.py), asks the proposer for them, and hands them to the scheduler through
ModelRunnerOutput.spec_token_ids. The draft distributions q of sampled model drafts wait here for the verify
step's rejection sampler.
"""
from __future__ import annotations

import time

import torch

from tokenloom.spec_decode.adaptive import AdaptiveK
from tokenloom.spec_decode.proposer import DraftRequest, Proposer, common_prefix


class Speculator:
    def __init__(self, proposer: Proposer, max_model_len: int, block_size: int, adaptive: bool = True,
                 eos_token_ids: tuple[int, ...] = ()):
        self.proposer = proposer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_size = block_size
        self.max_k = proposer.num_speculative_tokens
        self.max_model_len = max_model_len
        self.adaptive = AdaptiveK(self.max_k, adaptive, proposer.cheap)
        self.draft_probs: dict[str, torch.Tensor] = {}  # request id -> q of its pending drafts
        self.shadow: dict[str, list[int]] = {}  # cheap drafts not verified (paused): scored against what came
        self.kinds: dict[str, tuple] = {}  # request id -> the statistics key of its pending (or shadow) drafts
        self.draft_step_seconds = 0.0  # a costly proposer's time per draft position, for the whole batch

    def drop(self, request_ids) -> None:
        if not request_ids:
            return
        self.proposer.remove_requests(request_ids)
        self.adaptive.remove_requests(request_ids)
        for rid in request_ids:
            self.draft_probs.pop(rid, None)
            self.shadow.pop(rid, None)
            self.kinds.pop(rid, None)

    def after_step(self, sched, out, seconds: float) -> None:
        """Learn from the step `sched` just run (its output `out`, its wall time), then draft for the next."""
        self._learn(sched, out, seconds)
        reqs, remaining = [], []
        for req, kept in zip(out.requests, out.sampled_token_ids):
            tokens = req.all_token_ids + kept
            room = min(self.max_k, req.max_tokens - len(req.output_token_ids) - len(kept) - 1,
                       self.max_model_len - len(tokens) - 1)
            if self.proposer.needs_lookahead_slots:  # draft K/V up to position len(tokens) + room - 2
                room = min(room, len(req.block_table) * self.block_size - len(tokens) + 1)
            if kept and self._stops(req, kept[-1], len(req.output_token_ids) + len(kept)):
                room = 0  # the request ends with this step
            reqs.append(DraftRequest(req.request_id, tokens, max(room, 0), req.params, req.block_table,
                                     req.generator))
            remaining.append(req.max_tokens - len(req.output_token_ids) - len(kept))
        # nobody waiting for a slot: the batch runs until its longest request is done (AdaptiveK.plan)
        out.spec_token_ids = self._draft(reqs, remaining if not sched.num_waiting else None)

    def _stops(self, req, token: int, num_output: int) -> bool:
        p = req.params
        return num_output >= p.min_tokens and (token in (p.stop_token_ids or ()) or (
            not p.ignore_eos and token in self.eos_token_ids))

    def _learn(self, sched, out, seconds: float) -> None:
        if all(item.num_tokens == 1 + len(item.spec_token_ids) for item in sched.scheduled):
            self.adaptive.cost.observe(sched.num_tokens, seconds)  # decode steps: their cost by rows
        drafted = {id(item.request): item.spec_token_ids for item in sched.scheduled if item.spec_token_ids}
        for req, kept in zip(out.requests, out.sampled_token_ids):
            rid = req.request_id
            drafts = drafted.get(id(req))
            key = self.kinds.pop(rid, (rid, 0))
            shadow = self.shadow.pop(rid, None)
            if drafts:
                self.adaptive.observe(key, len(drafts), len(kept) - 1)
            elif shadow:
                n = min(len(shadow), len(kept))
                self.adaptive.observe(key, n, common_prefix(shadow[:n], kept))
            self.draft_probs.pop(rid, None)

    def _draft(self, reqs: list[DraftRequest], remaining: list[int] | None) -> list[list[int]]:
        ids = [r.request_id for r in reqs]
        if self.proposer.cheap:
            drafts = self.proposer.propose(reqs)
            keys = [(rid, d.kind) for rid, d in zip(ids, drafts)]
            ks = self.adaptive.plan(keys, [len(d.token_ids) for d in drafts], remaining=remaining)
            for key, d, k in zip(keys, drafts, ks):
                if d.token_ids:
                    self.kinds[key[0]] = key
                    if not k:  # not verified: scored against the tokens that come
                        self.shadow[key[0]] = d.token_ids
            return [d.token_ids[:k] for d, k in zip(drafts, ks)]
        keys = [(rid, 0) for rid in ids]
        ks = self.adaptive.plan(keys, [r.num_drafts for r in reqs], self.draft_step_seconds, remaining)
        todo, probing = [], not any(ks)
        for r, k in zip(reqs, self.adaptive.probe(ks, [r.num_drafts for r in reqs])):
            r.num_drafts = k
            if k:
                todo.append(r)
        result = {}
        if todo:
            start = time.perf_counter()
            for r, d in zip(todo, self.proposer.propose(todo)):
                result[r.request_id] = d.token_ids
                if d.probs is not None and d.token_ids:
                    self.draft_probs[r.request_id] = d.probs
            depth, seconds = max(r.num_drafts for r in todo), time.perf_counter() - start
            if probing:
                self.adaptive.probed(seconds)
            step = seconds / max(depth, 1)
            old = self.draft_step_seconds
            self.draft_step_seconds = step if not old else 0.8 * old + 0.2 * step
        return [result.get(rid, []) for rid in ids]
