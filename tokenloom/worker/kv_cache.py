"""The KV cache tensors: one pool for all layers, [layer, k/v, slot, kv_head, head_dim], a slot being
`block * block_size + offset`; int8 caches keep a float32 scale per slot and head.

On the CPU the pool's pages cost memory only once written (calloc), and `release_blocks` gives the pages of
blocks that stay free back to the OS (madvise MADV_DONTNEED), so the process's resident memory follows the KV
cache in use rather than the most it ever held.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os

import numpy as np
import torch

from tokenloom.config import CacheConfig, ModelConfig
from tokenloom.model_executor.layers.attention import LayerKVCache


def available_memory(device: torch.device) -> int:
    """Bytes free to draw on: free accelerator memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable page cache too
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    slots = cfg.num_layers * 2 * block_size * cfg.num_kv_heads
    if kv_cache_dtype == "int8":  # one byte per element plus a float32 scale per slot and head
        return slots * (cfg.head_dim + 4)
    return slots * cfg.head_dim * torch.finfo(dtype).bits // 8


def zeros_lazily(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose pages the OS supplies on first touch (an anonymous mapping, page-aligned so that
    blocks map onto whole pages), so a large KV pool costs nothing up front. Slots never written must read as
    zeros: padded attention keys may point at them."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # the tensor keeps the mapping alive; private, so that pages given back (release_pages) are dropped, not kept
    # by a shared mapping
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)


_MADV_DONTNEED = 4  # Linux: private anonymous pages read as zeros on the next touch


def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


_MADVISE = _madvise()


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_pages(tensor: torch.Tensor, block_runs: np.ndarray, slots_per_block: int) -> int:
    """Give back the whole pages inside `block_runs` ([n, 2] start/stop blocks) of every [layer, k/v] plane of a
    contiguous [layer, 2, slot, ...] CPU tensor. Returns the bytes released."""
    if _MADVISE is None or tensor.device.type != "cpu" or not len(block_runs):
        return 0
    page = mmap.PAGESIZE
    block_bytes = slots_per_block * tensor[0, 0, 0].numel() * tensor.element_size()
    plane_bytes = tensor[0, 0].numel() * tensor.element_size()
    planes = tensor.data_ptr() + plane_bytes * np.arange(tensor.shape[0] * tensor.shape[1], dtype=np.int64)
    starts = (planes[:, None] + block_runs[None, :, 0] * block_bytes + page - 1) // page * page
    stops = (planes[:, None] + block_runs[None, :, 1] * block_bytes) // page * page
    keep = stops > starts
    released = 0
    for start, length in zip(starts[keep].tolist(), (stops - starts)[keep].tolist()):
        if _MADVISE(start, length, _MADV_DONTNEED) == 0:
            released += length
    return released


def block_runs(blocks: list[int]) -> np.ndarray:
    """Sorted runs of consecutive block ids as [n, 2] (start, stop) rows."""
    ids = np.unique(np.asarray(blocks, dtype=np.int64))
    if not len(ids):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([ids[0]], ids[breaks]))
    stops = np.concatenate((ids[breaks - 1], [ids[-1]])) + 1
    return np.stack([starts, stops], axis=1)


class KVCache:
    def __init__(self, cfg: ModelConfig, cache_config: CacheConfig, num_blocks: int, dtype: torch.dtype,
                 device: torch.device, layers: range | None = None):
        """layers: the layers this process runs (a pipeline stage's); the others get no cache (None)."""
        self.block_size = cache_config.block_size
        layers = layers if layers is not None else range(cfg.num_layers)
        shape = (len(layers), 2, num_blocks * self.block_size, cfg.num_kv_heads, cfg.head_dim)
        quantized = cache_config.kv_cache_dtype == "int8"
        self.tensor = zeros_lazily(shape, torch.int8 if quantized else dtype, device)
        self.scales = zeros_lazily(shape[:-1], torch.float32, device) if quantized else None
        self.layers: list[LayerKVCache | None] = [None] * cfg.num_layers
        for i, layer in enumerate(layers):
            self.layers[layer] = LayerKVCache(self.tensor[i, 0], self.tensor[i, 1],
                                              *((self.scales[i, 0], self.scales[i, 1]) if quantized else ()))

    @property
    def nbytes(self) -> int:
        """The pool's size (its pages cost memory once written)."""
        return sum(t.numel() * t.element_size() for t in (self.tensor, self.scales) if t is not None)

    @property
    def blocks_per_page(self) -> int:
        """How many blocks of the thinnest plane one page can reach across (release_blocks' `blocks` should name
        the empty neighbours that far from a released block, so pages on the border go too)."""
        rows = [self.block_size * t[0, 0, 0].numel() * t.element_size() for t in (self.tensor, self.scales)
                if t is not None]
        return -(-mmap.PAGESIZE // min(rows))

    def release_blocks(self, blocks: list[int]) -> int:
        """Return the memory of these (free) blocks to the OS, in every layer; their slots read as zeros when
        next touched, as never-written slots do. Returns the bytes released."""
        runs = block_runs(blocks)
        tensors = (self.tensor, self.scales) if self.scales is not None else (self.tensor,)
        return sum(release_pages(t, runs, self.block_size) for t in tensors)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's slots into block dst, in every layer."""
        bs = self.block_size
        for src, dst in copies:
            for t in (self.tensor, self.scales) if self.scales is not None else (self.tensor,):
                t[:, :, dst * bs : (dst + 1) * bs] = t[:, :, src * bs : (src + 1) * bs]
