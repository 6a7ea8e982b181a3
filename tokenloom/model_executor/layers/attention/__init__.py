"""Attention over a paged KV cache, behind a small backend interface (backend.py).

The KV cache of one layer is two tensors of shape [num_slots, num_kv_heads, head_dim] (LayerKVCache), where a slot
is `block_id * block_size + offset`. A step's metadata (metadata.py) is built once and shared by all layers;
paged_attention runs one layer's attention through the backend that fits: the fused CPU decode kernel where it
is built and the cache is read as it is, else the torch path.
"""
from __future__ import annotations

import torch

from tokenloom.model_executor.layers.attention.backend import AttentionBackend
from tokenloom.model_executor.layers.attention.cpu_fused import CpuFusedAttentionBackend
from tokenloom.model_executor.layers.attention.kv_cache import LayerKVCache
from tokenloom.model_executor.layers.attention.metadata import (
    AttentionBatch,
    AttentionMetadata,
    StaticDecodeMetadata,
    build_attention_metadata,
    build_decode_metadata,
)
from tokenloom.model_executor.layers.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionBatch", "AttentionMetadata", "CpuFusedAttentionBackend", "LayerKVCache",
           "StaticDecodeMetadata", "TorchAttentionBackend", "build_attention_metadata", "build_decode_metadata",
           "paged_attention", "select_backend"]

TORCH_BACKEND = TorchAttentionBackend()
CPU_FUSED_BACKEND = CpuFusedAttentionBackend()


def select_backend(q: torch.Tensor, cache: LayerKVCache) -> AttentionBackend:
    return CPU_FUSED_BACKEND if CPU_FUSED_BACKEND.supports(q, cache) else TORCH_BACKEND


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                    scale: float, softcap: float | None = None) -> torch.Tensor:
    """One layer's attention: new k/v [T, KVH, D] written into `cache`, q [T, H, D] -> [T, H * D]. softcap: the
    scores go through softcap * tanh(scores / softcap) before the softmax (Gemma 2), which only the torch path
    does."""
    if softcap is not None:
        return TORCH_BACKEND.attend(q, k, v, cache, meta, scale, softcap)
    return select_backend(q, cache).attend(q, k, v, cache, meta, scale)
