"""The reference attention path in torch ops: SDPA for a lone prefill from position 0, else a gather of each
sequence's context out of the paged cache, then batched matmuls (or SDPA for large batches) under a mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenloom.model_executor.layers.attention.backend import AttentionBackend
from tokenloom.model_executor.layers.attention.kv_cache import LayerKVCache
from tokenloom.model_executor.layers.attention.metadata import AttentionBatch, AttentionMetadata
from tokenloom.model_executor.layers.linear import ROW_BUCKET

# Above this many attention scores (B*H*Q*L) a batch goes through the flash kernel, which never holds them all.
MATMUL_ATTENTION_MAX_SCORES = 1 << 23


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
               meta: AttentionMetadata, scale: float, softcap: float | None = None) -> torch.Tensor:
        T, H, D = q.shape
        cache.write(meta.slot_mapping, k, v)
        if meta.causal_only and softcap is not None:
            return _softcapped_causal(q, k, v, scale, softcap)
        if meta.causal_only:
            return _causal(q, k, v, scale)
        if len(meta.batches) == 1:
            return self.attend_batch(q, cache, meta.batches[0], scale, softcap)
        out = q.new_empty(T, H * D)
        for b in meta.batches:
            out[b.token_rows] = self.attend_batch(q[b.token_rows], cache, b, scale, softcap)
        return out

    def attend_batch(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionBatch, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
        """Attention of one batch's query tokens [tokens, H, D] over their sequences' cached context (their own
        new K/V already written)."""
        T, H, D = q.shape
        KVH = cache.k.shape[1]
        G = H // KVH
        B, Q = meta.num_seqs, meta.max_query_len
        L = meta.key_slots.shape[1]
        if meta.key_rows is None:  # gather straight into [B, KVH, L, D] order: no transposed copies later
            heads = torch.arange(KVH, device=q.device)
            meta.key_rows = (meta.key_slots[:, None, :] * KVH + heads[None, :, None]).reshape(-1)
        keys, values = cache.read(meta.key_rows, q.dtype)
        keys, values = keys.view(B, KVH, L, D), values.view(B, KVH, L, D)
        if Q == 1:  # pure decode: one query per sequence, already in order
            q_pad = q.reshape(B, KVH, G, D)
        else:
            q_pad = torch.cat((q, q.new_zeros(1, H, D)))[meta.query_index]  # [B*Q, H, D]
            # Fold the query heads that share a KV head into the query axis: GQA without repeating K/V.
            q_pad = q_pad.view(B, Q, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * Q, D)
        if B * H * Q * L <= MATMUL_ATTENTION_MAX_SCORES or softcap is not None:
            # Plain batched matmuls and a float32 softmax: several times faster than the CPU flash kernel with a
            # mask at these sizes (the score matrix is small); the flash kernel has no soft-capping.
            scores = torch.matmul(q_pad, keys.transpose(-1, -2)).float() * scale  # [B, KVH, G*Q, L]
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            probs = scores.masked_fill_(~meta.mask, float("-inf")).softmax(-1).to(q.dtype)
            out = torch.matmul(probs, values)
        else:
            out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=meta.sdpa_mask(q.dtype), scale=scale)
        if Q == 1:
            return out.reshape(T, H * D)
        out = out.view(B, KVH, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H * D)
        return out[meta.out_index]


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A lone prefill from position 0 through SDPA's flash kernel: [T, H * D]. The sequence is padded with zero
    rows to a multiple of ROW_BUCKET: the kernel keeps compiled code per length for good, so a server's memory
    grew with every new prompt length; causality keeps the real rows from seeing the padding after them. The
    inputs are 4-D ([1, heads, T, D]): given 3-D ones, SDPA on the CPU takes its math path, which materialises
    every score (23x slower at 2048 tokens)."""
    T, H, D = q.shape
    pad = -T % ROW_BUCKET if T >= ROW_BUCKET else 0
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x for x in (q, k, v))
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H > k.shape[1])
    return out[0].transpose(0, 1)[:T].reshape(T, H * D)


def _softcapped_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float
                       ) -> torch.Tensor:
    """A lone prefill from position 0 with soft-capped scores (SDPA has no soft-capping): [T, H * D]."""
    T, H, D = q.shape
    KVH = k.shape[1]
    qg = q.view(T, KVH, H // KVH, D).permute(1, 2, 0, 3)  # [KVH, G, T, D]: GQA without repeating K/V
    scores = torch.matmul(qg, k.permute(1, 2, 0)[:, None]).float() * scale  # [KVH, G, T, T]
    scores = torch.tanh(scores / softcap) * softcap
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill_(~causal, float("-inf")).softmax(-1).to(q.dtype)
    out = torch.matmul(probs, v.permute(1, 0, 2)[:, None])  # [KVH, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(T, H * D)
