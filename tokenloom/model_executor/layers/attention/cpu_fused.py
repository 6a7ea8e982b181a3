"""Pure-decode batches through the fused C++ paged decode kernel (tokenloom.kernels.cpu_ops): each query reads its
K/V straight from the paged cache through its block table, no gather, padding or mask (an int8 cache dequantized
as it is read, as LayerKVCache.read does). Prefill batches and the lone causal prefill take the torch path."""
from __future__ import annotations

import torch

from tokenloom.kernels import cpu_ops
from tokenloom.model_executor.layers.attention.kv_cache import LayerKVCache
from tokenloom.model_executor.layers.attention.metadata import AttentionBatch
from tokenloom.model_executor.layers.attention.torch_backend import TorchAttentionBackend


class CpuFusedAttentionBackend(TorchAttentionBackend):
    name = "cpu_fused"

    @staticmethod
    def supports(q: torch.Tensor, cache: LayerKVCache) -> bool:
        """The kernel is built for q's device and dtype and reads this cache as it is (q's dtype, or int8)."""
        return (cache.k.dtype in (q.dtype, torch.int8) and q.shape[-1] % 16 == 0 and cpu_ops.ops_for(q) is not None)

    def attend_batch(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionBatch, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
        if meta.max_query_len != 1 or softcap is not None:
            return super().attend_batch(q, cache, meta, scale, softcap)
        return cpu_ops.ops_for(q).paged_decode_attention(q, cache.k, cache.v, meta.block_table, meta.block_size,
                                                         meta.context_lens, meta.key_start, scale, cache.k_scale,
                                                         cache.v_scale)
