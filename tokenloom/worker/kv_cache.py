"""The KV cache tensors: one pool for all layers, [layer, k/v, slot, kv_head, head_dim], a slot being
`block * block_size + offset`; int8 caches keep a float32 scale per slot and head."""
from __future__ import annotations

import math

import numpy as np
import torch

from tokenloom.config import CacheConfig, ModelConfig
from tokenloom.model_executor.layers.attention import LayerKVCache


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    slots = cfg.num_layers * 2 * block_size * cfg.num_kv_heads
    if kv_cache_dtype == "int8":  # one byte per element plus a float32 scale per slot and head
        return slots * (cfg.head_dim + 4)
    return slots * cfg.head_dim * torch.finfo(dtype).bits // 8


def zeros_lazily(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose pages the OS supplies on first touch (calloc), so a large KV pool costs nothing
    up front. Slots never written must read as zeros: padded attention keys may point at them."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVCache:
    def __init__(self, cfg: ModelConfig, cache_config: CacheConfig, num_blocks: int, dtype: torch.dtype,
                 device: torch.device):
        self.block_size = cache_config.block_size
        shape = (cfg.num_layers, 2, num_blocks * self.block_size, cfg.num_kv_heads, cfg.head_dim)
        quantized = cache_config.kv_cache_dtype == "int8"
        self.tensor = zeros_lazily(shape, torch.int8 if quantized else dtype, device)
        self.scales = zeros_lazily(shape[:-1], torch.float32, device) if quantized else None
        self.layers = [
            LayerKVCache(self.tensor[i, 0], self.tensor[i, 1],
                         *((self.scales[i, 0], self.scales[i, 1]) if quantized else ()))
            for i in range(cfg.num_layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's slots into block dst, in every layer."""
        bs = self.block_size
        for src, dst in copies:
            for t in (self.tensor, self.scales) if self.scales is not None else (self.tensor,):
                t[:, :, dst * bs : (dst + 1) * bs] = t[:, :, src * bs : (src + 1) * bs]
