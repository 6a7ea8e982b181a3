"""Paged KV-cache block manager: free list, reference counts, copy-on-write and automatic prefix caching.

A full block is named by a hash chained over its tokens and every token before it, so two requests with the
same prefix map to the same physical blocks. When a block's last reference goes it keeps its contents and its
hash and joins the free list; the free list is LRU-ordered, so cached blocks are evicted oldest first, and only
when a fresh block is needed.
"""
from __future__ import annotations

from collections import OrderedDict

from tokenloom.core.request import Request


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Front = next to be reused (least recently used); blocks with no cached contents go first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[int]:
        """Chained hashes of the request's first num_full_blocks blocks (memoised on the request)."""
        hashes, bs = req.block_hashes, self.block_size
        if len(hashes) < num_full_blocks:
            tokens = req.all_token_ids
            parent = hashes[-1] if hashes else None
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
            block = self.hash_to_block.get(h)
            if block is None:
                break
            blocks.append(block)
        self.prefix_queries += req.num_prompt_tokens
        self.prefix_hits += min(len(blocks) * self.block_size, req.num_prompt_tokens)
        return blocks

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate(self, req: Request, num_tokens: int, cached_blocks: list[int] = ()) -> list[tuple[int, int]] | None:
        """Make the request's block table cover num_tokens tokens.

        cached_blocks (only for a request with no blocks yet) are prefix-cache hits to adopt first.
        Returns the (src, dst) block copies that copy-on-write needs before the step, or None (and no change)
        when there are not enough free blocks.
        """
        table = req.block_table
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        new_blocks = self.blocks_needed(num_tokens) - len(table) - len(cached_blocks)
        # The block the next token lands in is shared with a fork: it must be copied before it is written.
        cow_index = req.num_computed_tokens // self.block_size
        needs_cow = not cached_blocks and cow_index < len(table) and self.ref_counts[table[cow_index]] > 1
        if max(new_blocks, 0) + needs_cow + revived > len(self.free):
            return None
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
            table.append(b)
        if cached_blocks:
            req.num_hashed_blocks = len(cached_blocks)
        copies = []
        if needs_cow:
            src = table[cow_index]
            dst = self._take_free_block()
            self.ref_counts[src] -= 1
            table[cow_index] = dst
            copies.append((src, dst))
        for _ in range(max(new_blocks, 0)):
            table.append(self._take_free_block())
        return copies

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def free_request(self, req: Request) -> None:
        # Tail blocks first, so that on eviction a prefix's later blocks go before its earlier ones.
        for block in reversed(req.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"double free of block {block}"
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:
                    self.free.move_to_end(block, last=False)
        req.block_table = []
        req.num_hashed_blocks = 0

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares every block of the parent; a shared partial block is copied on first write."""
        child.block_table = list(parent.block_table)
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self.ref_counts[block] += 1

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly filled blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= req.num_hashed_blocks:
            return
        hashes = self._block_hashes(req, num_full)
        for i in range(req.num_hashed_blocks, num_full):
            block, h = req.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        req.num_hashed_blocks = num_full

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.hash_to_block.items()):
            if self.ref_counts[block] == 0:
                self.block_hash[block] = None
                del self.hash_to_block[h]
                self.free.move_to_end(block, last=False)

    def check_invariants(self, live_requests: list[Request]) -> None:
        """Reference counts equal the number of live block-table entries; free list = blocks with no owner."""
        counts = [0] * self.num_blocks
        for req in live_requests:
            for b in req.block_table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts drifted from block tables"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert free == set(self.free), "free list does not match unowned blocks"
        assert len(self.free) == len(set(self.free))
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h
