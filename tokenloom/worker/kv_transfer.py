"""Moving a request's KV blocks between engines on one host (prefill/decode disaggregation).

The prefill side writes the K/V (and, int8 caches, the scales) of some of a request's blocks into a shared-memory
file (/dev/shm); the decode side maps that file and copies the blocks into the slots of blocks it allocated. A
segment holds its blocks back to back, in every cache of the executor ([layer, k/v, block slots, kv_head, dim]
each), so one read per cache brings them in. The file is the hand-off: its producer writes it and forgets it, its
consumer (or whoever aborts the transfer) unlinks it.

Tensor / pipeline parallel executors (K/V split over workers) are out of scope: both sides run one process.
"""
from __future__ import annotations

import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_names = itertools.count()


class KVTransferError(Exception):
    """A segment could not be read (missing, truncated, another layout): the receiver recomputes instead."""


@dataclass
class KVSegment:
    """The hand-off of one request's prompt K/V: where it is and what it holds (sent between processes)."""
    path: str
    num_prompt_tokens: int
    block_size: int
    # chained prefix-cache hashes of the prompt's full blocks (kv_cache_manager), every one, sent or not
    block_hashes: list[int]
    first_block: int  # blocks before it were not sent (the receiver holds them, the sender was told)
    num_blocks: int  # blocks in the file: first_block .. first_block + num_blocks (the last may be partial)
    layout: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # per cache tensor: dtype, one block
    nbytes: int = 0
    export_seconds: float = 0.0
    created: float = field(default_factory=time.monotonic)  # CLOCK_MONOTONIC: comparable across processes

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def segment_path(tag: str) -> str:
    return os.path.join(SHM_DIR, f"tokenloom-kv-{tag}-{os.getpid()}-{next(_names)}")


def _tensors(caches) -> list[torch.Tensor]:
    """Every tensor of every KV cache (worker.kv_cache.KVCache): its K/V, and an int8 cache's scales."""
    out = []
    for cache in caches:
        out.append(cache.tensor)
        if cache.scales is not None:
            out.append(cache.scales)
    return out


def _slots(blocks: list[int], block_size: int, num_slots: int | None = None) -> torch.Tensor:
    slots = (torch.tensor(blocks, dtype=torch.long)[:, None] * block_size + torch.arange(block_size)).flatten()
    return slots if num_slots is None else slots[:num_slots]


def _block_shape(t: torch.Tensor, block_size: int) -> tuple[int, ...]:
    return (t.shape[0], t.shape[1], block_size, *t.shape[3:])


def export_blocks(caches, blocks: list[int], block_size: int, path: str) -> tuple[list, int]:
    """Write these blocks' K/V of every cache into a new file at path; returns (layout, bytes written)."""
    tensors = _tensors(caches)
    layout = [(str(t.dtype).removeprefix("torch."), _block_shape(t, block_size)) for t in tensors]
    n = len(blocks)
    sizes = [t[:, :, :block_size].numel() * n for t in tensors]
    total = sum(s * t.element_size() for s, t in zip(sizes, tensors))
    if total == 0:  # every block is held on the other side: an empty hand-off
        open(path, "wb").close()
        return layout, 0
    out = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    slots = _slots(blocks, block_size)
    offset = 0
    for t, size in zip(tensors, sizes):
        nb = size * t.element_size()
        view = out[offset : offset + nb].view(t.dtype).view(t.shape[0], t.shape[1], n * block_size, *t.shape[3:])
        torch.index_select(t, 2, slots, out=view)  # gathered straight into the shared file
        offset += nb
    return layout, total


def import_blocks(caches, blocks: list[int], segment: KVSegment, skip: int = 0) -> int:
    """Copy the segment's blocks, from its block number first_block + skip on, into these blocks of every cache
    (len(blocks) of them). KVTransferError when the file is gone or does not match the caches. Returns bytes read."""
    tensors = _tensors(caches)
    bs = segment.block_size
    layout = [(str(t.dtype).removeprefix("torch."), _block_shape(t, bs)) for t in tensors]
    if layout != [(d, tuple(s)) for d, s in segment.layout]:
        raise KVTransferError("the segment's KV layout differs from this engine's (another model or dtype)")
    if skip + len(blocks) > segment.num_blocks:
        raise KVTransferError("the segment holds fewer blocks than asked for")
    try:
        if os.path.getsize(segment.path) != segment.nbytes:
            raise KVTransferError("the segment's file is truncated")
        data = torch.from_file(segment.path, shared=False, size=segment.nbytes, dtype=torch.uint8)
    except (OSError, RuntimeError) as exc:
        raise KVTransferError(f"cannot read the KV segment: {exc}") from None
    slots = _slots(blocks, bs)
    offset, read = 0, 0
    for t in tensors:
        nb = t[:, :, :bs].numel() * segment.num_blocks * t.element_size()
        src = data[offset : offset + nb].view(t.dtype).view(t.shape[0], t.shape[1], segment.num_blocks * bs,
                                                            *t.shape[3:])
        t.index_copy_(2, slots, src[:, :, skip * bs : (skip + len(blocks)) * bs])
        read += nb * len(blocks) // segment.num_blocks
        offset += nb
    return read
