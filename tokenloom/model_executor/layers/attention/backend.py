"""The attention backend interface: how a layer attends over the paged KV cache.

The runner builds one AttentionMetadata per step (build_metadata); every layer shares it and calls attend() with
its new q/k/v and its own LayerKVCache. Backends: torch_backend (the reference torch path, any device and cache
dtype) and cpu_fused (the fused C++ paged decode kernel, torch for the rest); select_backend picks one per call.
"""
from __future__ import annotations

import torch

from tokenloom.model_executor.layers.attention.kv_cache import LayerKVCache
from tokenloom.model_executor.layers.attention.metadata import AttentionMetadata, build_attention_metadata


class AttentionBackend:
    name = "abstract"

    @staticmethod
    def build_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                       block_size: int, group_size: int, sliding_window: int | None,
                       device: torch.device) -> AttentionMetadata:
        """The step's index tensors: query_lens[i] new tokens of sequence i end at context_lens[i]."""
        return build_attention_metadata(query_lens, context_lens, block_tables, block_size, group_size,
                                        sliding_window, device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
               meta: AttentionMetadata, scale: float, softcap: float | None = None) -> torch.Tensor:
        """Write the step's new k/v [T, KVH, D] into `cache`, then attend each token's q [T, H, D] over its
        sequence's context: [T, H * D]. softcap: tanh soft-capping of the scores (paged_attention)."""
        raise NotImplementedError
