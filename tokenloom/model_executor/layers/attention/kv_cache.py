"""One layer's view of the paged KV cache."""
from __future__ import annotations

import torch


class LayerKVCache:
    """One layer's K and V slots, [S, KVH, D] each, a slot being `block_id * block_size + offset`; int8 caches
    keep a float32 scale per slot and head."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        self.k, self.v, self.k_scale, self.v_scale = k, v, k_scale, v_scale

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        scale = xf.abs().amax(-1).clamp(min=1e-8) / 127.0  # symmetric, per token and head
        return torch.round(xf / scale[..., None]).to(torch.int8), scale

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k_scale is None:
            self.k.index_copy_(0, slots, k.to(self.k.dtype))
            self.v.index_copy_(0, slots, v.to(self.v.dtype))
            return
        for cache, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, scale = self._quantize(x)
            cache.index_copy_(0, slots, q)
            scales.index_copy_(0, slots, scale)

    def read(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather (slot, head) rows of the cache viewed as [S*KVH, D]."""
        D = self.k.shape[-1]
        k, v = self.k.view(-1, D).index_select(0, rows), self.v.view(-1, D).index_select(0, rows)
        if self.k_scale is None:
            return k.to(dtype), v.to(dtype)
        return ((k * self.k_scale.view(-1).index_select(0, rows)[:, None]).to(dtype),
                (v * self.v_scale.view(-1).index_select(0, rows)[:, None]).to(dtype))
