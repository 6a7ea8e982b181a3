"""The KV cache manager: each request's block table over the block pool, prefix-cache lookups, copy-on-write for
forked requests, and lookahead slots for speculative tokens.

The scheduler asks it for slots before it schedules tokens (`allocate_slots`); a request whose tokens do not fit
gets nothing (no partial change), so the scheduler can preempt and retry.
"""
from __future__ import annotations

from tokenloom.core.block_pool import BlockPool
from tokenloom.core.request import Request


_ROOT = 0x746C6B76  # the first block's parent (base model): hash(None) differs between processes before 3.12


def chain_hash(parent, tokens: tuple[int, ...]) -> int:
    """A block's name from its parent's and its tokens; the same in every process (prefill/decode workers
    compare them) unless parent is an adapter's seed."""
    return hash((_ROOT if parent is None else parent, tokens))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_resident_blocks(self) -> int:
        """Blocks whose memory has been written since they were last trimmed."""
        return self.pool.num_resident

    @property
    def ref_counts(self) -> list[int]:
        return self.pool.ref_counts

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[int]:
        """Chained hashes of the request's first num_full_blocks blocks (memoised on the request)."""
        hashes, bs = req.block_hashes, self.block_size
        if len(hashes) < num_full_blocks:
            tokens = req.all_token_ids
            # the first block's parent is the request's adapter (None: base), which so names every block after it
            parent = hashes[-1] if hashes else req.lora_hash_seed
            for i in range(len(hashes), num_full_blocks):
                parent = chain_hash(parent, tuple(tokens[i * bs : (i + 1) * bs]))
                hashes.append(parent)
        return hashes[:num_full_blocks]

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        num_full = (req.num_tokens - 1) // self.block_size
        blocks = []
        for h in self._block_hashes(req, num_full):
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        self.prefix_queries += req.num_prompt_tokens
        self.prefix_hits += min(len(blocks) * self.block_size, req.num_prompt_tokens)
        return blocks

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, num_lookahead_tokens: int = 0,
                       cached_blocks: list[int] = ()) -> list[tuple[int, int]] | None:
        """Slots for the request's next num_new_tokens tokens, plus num_lookahead_tokens more for speculative
        tokens that may be rolled back (their slots are simply written again later)."""
        return self.allocate(req, req.num_computed_tokens + num_new_tokens + num_lookahead_tokens, cached_blocks)

    def allocate(self, req: Request, num_tokens: int, cached_blocks: list[int] = ()) -> list[tuple[int, int]] | None:
        """Make the request's block table cover num_tokens tokens.

        cached_blocks (only for a request with no blocks yet) are prefix-cache hits to adopt first.
        Returns the (src, dst) block copies that copy-on-write needs before the step, or None (and no change)
        when there are not enough free blocks.
        """
        pool, table = self.pool, req.block_table
        revived = sum(1 for b in cached_blocks if pool.ref_counts[b] == 0)
        new_blocks = self.blocks_needed(num_tokens) - len(table) - len(cached_blocks)
        # The block the next token lands in is shared with a fork: it must be copied before it is written.
        cow_index = req.num_computed_tokens // self.block_size
        needs_cow = not cached_blocks and cow_index < len(table) and pool.ref_counts[table[cow_index]] > 1
        if max(new_blocks, 0) + needs_cow + revived > pool.num_free_blocks:
            return None
        for b in cached_blocks:
            pool.touch(b)
            table.append(b)
        if cached_blocks:
            req.num_hashed_blocks = len(cached_blocks)
        copies = []
        if needs_cow:
            src = table[cow_index]
            dst = pool.take()
            pool.release(src)  # still held by the fork it is shared with
            table[cow_index] = dst
            copies.append((src, dst))
        for _ in range(max(new_blocks, 0)):
            table.append(pool.take())
        return copies

    def free_request(self, req: Request) -> None:
        # Tail blocks first, so that on eviction a prefix's later blocks go before its earlier ones.
        for block in reversed(req.block_table):
            self.pool.release(block)
        req.block_table = []
        req.num_hashed_blocks = 0

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares every block of the parent; a shared partial block is copied on first write."""
        child.block_table = list(parent.block_table)
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self.pool.touch(block)

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly filled blocks (of computed, accepted tokens) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        # Only known tokens: accepted drafts are computed before they are appended to the output.
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        if num_full <= req.num_hashed_blocks:
            return
        hashes = self._block_hashes(req, num_full)
        for i in range(req.num_hashed_blocks, num_full):
            self.pool.register(req.block_table[i], hashes[i])
        req.num_hashed_blocks = num_full

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def trim(self, keep_cached_blocks: int, blocks_per_page: int = 1) -> tuple[int, list[int]]:
        """Free blocks unused since the previous trim (BlockPool.trim): how many, and the blocks whose memory the
        worker may return, with the empty neighbours that share pages with them (BlockPool.unbacked_around)."""
        released = self.pool.trim(keep_cached_blocks)
        return len(released), self.pool.unbacked_around(released, blocks_per_page) if released else []

    def check_invariants(self, live_requests: list[Request]) -> None:
        self.pool.check_invariants([req.block_table for req in live_requests])
