"""The pool of physical KV-cache blocks: reference counts, an LRU free list, and the prefix-cache index.

A full block is named by a hash chained over its tokens and every token before it (see kv_cache_manager), so two
requests with the same prefix map to the same physical blocks. When a block's last reference goes it keeps its
contents and its hash and joins the free list; the free list is LRU-ordered, so cached blocks are evicted oldest
first, and only when a fresh block is needed. Blocks holding nothing cached go to the front: they are reused first.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Front = next to be reused (least recently used).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def lookup(self, block_hash: int) -> int | None:
        """The block caching these contents, if any (it may be free: touch it to keep it)."""
        return self.hash_to_block.get(block_hash)

    def take(self) -> int:
        """A fresh block with one reference, evicting whatever it cached."""
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def touch(self, block: int) -> None:
        """One more reference to a (possibly free, cached) block."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"double free of block {block}"
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if self.block_hash[block] is None:
                self.free.move_to_end(block, last=False)

    def register(self, block: int, block_hash: int) -> None:
        """Index a full block's contents, unless the block or the contents are indexed already."""
        if self.block_hash[block] is None and block_hash not in self.hash_to_block:
            self.block_hash[block] = block_hash
            self.hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds."""
        for h, block in list(self.hash_to_block.items()):
            if self.ref_counts[block] == 0:
                self.block_hash[block] = None
                del self.hash_to_block[h]
                self.free.move_to_end(block, last=False)

    def check_invariants(self, block_tables: list[list[int]]) -> None:
        """Reference counts equal the number of live block-table entries; free list = blocks with no owner."""
        counts = [0] * self.num_blocks
        for table in block_tables:
            for b in table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts drifted from block tables"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert free == set(self.free), "free list does not match unowned blocks"
        assert len(self.free) == len(set(self.free))
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h
