"""The pool of physical KV-cache blocks: reference counts, an LRU free list, and the prefix-cache index.

A full block is named by a hash chained over its tokens and every token before it (see kv_cache_manager), and
over the LoRA adapter it was computed with, so two requests with the same prefix and adapter map to the same
physical blocks (and requests of different adapters never do). When a block's last reference goes it keeps its
contents and its hash and joins the free list; the free list is LRU-ordered, so cached blocks are evicted oldest
first, and only when a fresh block is needed. Blocks holding nothing cached go to the front: they are reused first.

Memory: the pool also knows which blocks' memory the process has touched (resident). `trim()` picks the free
blocks no one has used since the previous trim, forgets their cached contents beyond a small budget of the most
recently used, and hands them back so the worker can return their pages to the OS; they move to the back of the
free list, so blocks whose memory is still resident are reused before them. A page of the pool may straddle
two blocks; it can go only once neither holds anything, so `unbacked_around()` adds the empty free neighbours of
the released blocks (else pages on the border of blocks released in different trims would stay resident forever).
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
        self.resident = bytearray(num_blocks)  # 1 = its memory has been written since it was last trimmed
        self.num_resident = 0
        self.last_used = [0] * num_blocks  # the trim epoch in which the block was last taken, touched or freed
        self.epoch = 1

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
        self.last_used[block] = self.epoch
        if not self.resident[block]:
            self.resident[block] = 1
            self.num_resident += 1
        return block

    def touch(self, block: int) -> None:
        """One more reference to a (possibly free, cached) block."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1
        self.last_used[block] = self.epoch

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"double free of block {block}"
        if self.ref_counts[block] == 0:
            self.free[block] = None
            self.last_used[block] = self.epoch
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

    def trim(self, keep_cached: int) -> list[int]:
        """Free, resident blocks unused since the previous trim, whose memory may go back to the OS; cached ones
        among them are forgotten except the keep_cached most recently used. Starts a new epoch."""
        released, kept = [], 0
        for block in reversed(self.free):  # most recently used first
            h = self.block_hash[block]
            if h is not None and kept < keep_cached:
                kept += 1
                continue
            if not self.resident[block] or self.last_used[block] >= self.epoch:
                continue
            if h is not None:
                del self.hash_to_block[h]
                self.block_hash[block] = None
            released.append(block)
        for block in released:
            self.resident[block] = 0
            self.free.move_to_end(block)
        self.num_resident -= len(released)
        self.epoch += 1
        return released

    def unbacked_around(self, blocks: list[int], reach: int) -> list[int]:
        """These blocks and the free, non-resident ones within `reach` of them (a page spans at most that many
        neighbours), stopping at any block holding data: all the blocks whose shared pages may now go."""
        out = set(blocks)
        for block in blocks:
            for step in (-1, 1):
                n = block + step
                for _ in range(reach):
                    if not 0 <= n < self.num_blocks or self.ref_counts[n] or self.resident[n] or n in out:
                        break
                    out.add(n)
                    n += step
        return sorted(out)

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
            assert self.resident[b], "a cached block's memory was released"
        assert self.num_resident == sum(self.resident)
