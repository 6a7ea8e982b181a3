"""Randomised state-machine test of the KV cache manager: no leak, no double free, consistent counts."""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenloom.core.kv_cache_manager import KVCacheManager
from tokenloom.core.request import Request
from tokenloom.sampling_params import SamplingParams

BLOCK = 4
NUM_BLOCKS = 24
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2]]  # shared prefixes make cache hits likely


class KVCacheManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=True)
        self.live: list[Request] = []
        self.count = 0

    def _new(self, tokens):
        self.count += 1
        return Request(str(self.count), list(tokens), SamplingParams(), max_tokens=64)

    @rule(prefix=st.sampled_from([0, 1, None]), tail=st.lists(st.integers(10, 20), min_size=1, max_size=12),
          chunk=st.integers(1, 16))
    def admit(self, prefix, tail, chunk):
        req = self._new((PREFIXES[prefix] if prefix is not None else []) + tail)
        cached = self.bm.find_cached_prefix(req)
        num_cached = len(cached) * BLOCK
        assert num_cached < req.num_tokens
        n = min(chunk, req.num_tokens - num_cached)
        req.num_computed_tokens = num_cached
        if self.bm.allocate(req, num_cached + n, cached) is None:
            assert req.block_table == []
            return
        req.num_computed_tokens += n
        self.bm.cache_full_blocks(req)
        self.live.append(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), k=st.integers(1, 9))
    def compute(self, data, k):
        """Prefill more of a request, or decode (append a token and compute it)."""
        req = data.draw(st.sampled_from(self.live))
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(data.draw(st.integers(10, 20)))
            k = 1
        k = min(k, req.num_tokens - req.num_computed_tokens)
        table_before = list(req.block_table)
        copies = self.bm.allocate(req, req.num_computed_tokens + k)
        if copies is None:
            assert req.block_table == table_before
            return
        for src, dst in copies:  # copy-on-write replaced a shared block by a private one
            assert src in table_before and dst in req.block_table and self.bm.ref_counts[src] >= 1
        req.num_computed_tokens += k
        self.bm.cache_full_blocks(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = self._new(parent.prompt_token_ids)
        child.output_token_ids = list(parent.output_token_ids)
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        self.bm.free_request(req)

    @precondition(lambda self: self.live)
    @rule()
    def preempt_newest(self):
        req = self.live.pop()
        self.bm.free_request(req)
        req.num_computed_tokens = 0

    @rule()
    def reset_cache(self):
        self.bm.reset_prefix_cache()

    @rule(keep=st.integers(0, 4))
    def trim(self, keep):
        """Return free memory to the OS: only blocks no request holds, and no cached block stays indexed."""
        owned = {b for req in self.live for b in req.block_table}
        num_released, unmapped = self.bm.trim(keep, blocks_per_page=2)
        assert not owned & set(unmapped)  # with the empty neighbours: still nothing a request holds
        pool = self.bm.pool
        assert all(pool.block_hash[b] is None and not pool.resident[b] for b in unmapped)
        free = list(pool.free)  # given-back blocks are reused last
        assert set(free[len(free) - num_released:]) <= set(unmapped)

    @invariant()
    def consistent(self):
        self.bm.check_invariants(self.live)
        # Counted from the requests' own block tables, not from the manager's bookkeeping:
        owned = {b for req in self.live for b in req.block_table}
        assert self.bm.num_used_blocks == len(owned)
        assert self.bm.num_free_blocks == NUM_BLOCKS - len(owned)
        for req in self.live:  # every computed token has a slot, in memory that was not given back
            assert len(req.block_table) * BLOCK >= req.num_computed_tokens
            assert all(self.bm.pool.resident[b] for b in req.block_table)

    def teardown(self):
        for req in self.live:
            self.bm.free_request(req)
        self.bm.check_invariants([])
        assert self.bm.num_used_blocks == 0


KVCacheManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestKVCacheManager = KVCacheManagerMachine.TestCase
