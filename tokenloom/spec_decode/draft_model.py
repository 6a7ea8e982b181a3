"""A draft model proposes: a smaller model sharing the target's vocabulary (method draft_model), the target
quantized as its own draft (self), or the target's first layers and its head (layer_skip).

The draft runs in the engine's process on its own ModelRunner. Its K/V live at the same slots as the target's:
the draft's cache has as many blocks as the target's and is indexed by the target's block tables, so the
scheduler's allocation (with lookahead slots for the drafts) covers both and the draft needs no block manager of
its own. A layer-skip draft goes further and reads the target's own cache for its layers, which the target has
already filled for every accepted token. After each step the draft catches up on the tokens it has not seen (the
prompt at first, then the step's kept tokens; its drafts that were rejected are recomputed), then drafts one
token at a time. Greedy requests draft greedily (q one-hot); sampled ones draw from the draft's distribution
under the request's own settings and hand q to the rejection sampler.
"""
from __future__ import annotations

import torch

from tokenloom.sample import SamplingMetadata, SamplingRow
from tokenloom.sampling_params import SAMPLING_EPS
from tokenloom.spec_decode.proposer import Draft, DraftRequest, Proposer, common_prefix


class DraftModelProposer(Proposer):
    needs_lookahead_slots = True

    def __init__(self, num_speculative_tokens: int, runner, shares_target_cache: bool = False):
        """runner: a ModelRunner over the draft model (its own cache of the target's block count, or the
        target's layer caches when shares_target_cache)."""
        super().__init__(num_speculative_tokens)
        self.runner = runner
        self.shares_target_cache = shares_target_cache
        self.seen: dict[str, list[int]] = {}  # per request: the tokens whose draft K/V are in the cache

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        if not requests:
            return []
        runner = self.runner
        ids, starts, lens, tables, rows = [], [], [], [], []
        for r in requests:
            known = len(r.token_ids) - 1  # the last token is the first input of the draft run
            if self.shares_target_cache:
                done = known  # the target computed every token before it
            else:
                done = min(common_prefix(self.seen.get(r.request_id, ()), r.token_ids), known)
            ids += r.token_ids[done:]
            starts.append(done)
            lens.append(len(r.token_ids) - done)
            tables.append(r.block_table)
            rows.append(len(ids) - 1)
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        logits = runner.logits(ids, starts, lens, tables, rows)
        active = list(range(len(requests)))
        for depth in range(max(r.num_drafts for r in requests)):
            tokens, q = self._sample(logits, [requests[i] for i in active], [drafts[i] for i in active])
            for j, i in enumerate(active):
                drafts[i].append(tokens[j])
                if q is not None and requests[i].params.temperature >= SAMPLING_EPS:
                    probs[i].append(q[j])
            active = [i for i in active if len(drafts[i]) < requests[i].num_drafts]
            if not active:
                break
            logits = runner.logits([drafts[i][-1] for i in active],
                                   [len(requests[i].token_ids) + depth for i in active], [1] * len(active),
                                   [requests[i].block_table for i in active], list(range(len(active))))
        out = []
        for r, d, p in zip(requests, drafts, probs):
            self.seen[r.request_id] = r.token_ids + d[:-1]  # the last draft was never fed back
            out.append(Draft(d, torch.stack(p) if p else None))
        return out

    def _sample(self, logits: torch.Tensor, requests: list[DraftRequest], drafts: list[list[int]]):
        rows = [SamplingRow(r.params, r.token_ids, d, None) for r, d in zip(requests, drafts)]
        sampled = any(r.params.temperature >= SAMPLING_EPS for r in requests)
        out = self.runner.sampler(logits, SamplingMetadata.from_rows(rows, logits.device), return_probs=sampled)
        return out.token_ids, out.probs

    def remove_requests(self, request_ids) -> None:
        for rid in request_ids:
            self.seen.pop(rid, None)
