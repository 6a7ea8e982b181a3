"""Attention over a paged KV cache.

The KV cache of one layer is two tensors of shape [num_slots, num_kv_heads, head_dim] (LayerKVCache), where
a slot is `block_id * block_size + offset`. A step's tokens (prefill chunks and decodes of many sequences, flattened)
write their K/V into their slots, then each sequence attends over its own context by gathering the slots its
block table names. The gather indices and masks are built once per step (AttentionMetadata) and shared by all
layers, so the per-layer work is tensor ops only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    # Padded batch view used for attention: B sequences x Q query rows x L context keys.
    query_index: torch.Tensor | None  # [B*Q] row of the flat token batch (T = an all-zero pad row)
    key_slots: torch.Tensor | None  # [B, L] cache slot of each context position (pad: slot 0, masked)
    mask: torch.Tensor | None  # [B, 1, G*Q, L] bool, True = attend (already expanded over the GQA group G)
    out_index: torch.Tensor | None  # [T] row of the padded output holding each token's result
    num_seqs: int
    max_query_len: int
    # Single sequence prefilled from position 0: plain causal attention over the new tokens, no gather.
    causal_only: bool = False
    key_rows: torch.Tensor | None = None  # [B*KVH*L] rows of the cache viewed as [slot*KVH, D]; made by layer 0


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    group_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionMetadata:
    """Index tensors for one step. query_lens[i] new tokens of sequence i end at context_lens[i]."""
    B = len(query_lens)
    Q, L = max(query_lens), max(context_lens)
    T = sum(query_lens)
    max_blocks = max(len(bt) for bt in block_tables)
    table = torch.tensor([bt + [0] * (max_blocks - len(bt)) for bt in block_tables], dtype=torch.long)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    ctx_lens = torch.tensor(context_lens, dtype=torch.long)
    start = ctx_lens - q_lens  # position of each sequence's first new token

    # Slots of the new tokens (flattened over sequences).
    seq_of_token = torch.repeat_interleave(torch.arange(B), q_lens)
    offsets = torch.cumsum(q_lens, 0) - q_lens
    tok_pos = torch.arange(T) - offsets[seq_of_token] + start[seq_of_token]
    slot_mapping = table[seq_of_token, tok_pos // block_size] * block_size + tok_pos % block_size

    if B == 1 and context_lens[0] == query_lens[0] and (sliding_window is None or L <= sliding_window):
        return AttentionMetadata(slot_mapping.to(device), None, None, None, None, 1, Q, causal_only=True)

    key_pos = torch.arange(L)
    key_slots = table[:, (key_pos // block_size).clamp(max=max_blocks - 1)] * block_size + key_pos % block_size
    q_row = torch.arange(Q)
    query_pos = start[:, None] + q_row[None, :]  # [B, Q]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal within each sequence's context
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window
    valid_q = q_row[None, :] < q_lens[:, None]
    mask[~valid_q] = False
    mask[~valid_q, 0] = True  # pad rows attend to one key so softmax stays finite; their output is dropped

    query_index = torch.where(valid_q, offsets[:, None] + q_row[None, :], torch.full_like(query_pos, T)).reshape(-1)
    out_index = seq_of_token * Q + (torch.arange(T) - offsets[seq_of_token])
    mask = mask[:, None].expand(B, group_size, Q, L).reshape(B, 1, group_size * Q, L)
    return AttentionMetadata(
        slot_mapping.to(device), query_index.to(device), key_slots.to(device), mask.to(device),
        out_index.to(device), B, Q,
    )


class LayerKVCache:
    """One layer's K and V slots, [S, KVH, D] each; int8 caches keep a float32 scale per slot and head."""

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


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    cache: LayerKVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    T, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    cache.write(meta.slot_mapping, k, v)
    if meta.causal_only:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=G > 1
        )
        return out.transpose(0, 1).reshape(T, H * D)
    B, Q = meta.num_seqs, meta.max_query_len
    L = meta.key_slots.shape[1]
    if meta.key_rows is None:  # gather straight into [B, KVH, L, D] order: no transposed copies later
        heads = torch.arange(KVH, device=q.device)
        meta.key_rows = (meta.key_slots[:, None, :] * KVH + heads[None, :, None]).reshape(-1)
    keys, values = cache.read(meta.key_rows, q.dtype)
    keys, values = keys.view(B, KVH, L, D), values.view(B, KVH, L, D)
    if Q == 1:  # pure decode: one query per sequence, already in order; plain matmuls beat the flash kernel here
        scores = torch.matmul(q.view(B, KVH, G, D), keys.transpose(-1, -2)).float() * scale  # [B, KVH, G, L]
        probs = scores.masked_fill_(~meta.mask, float("-inf")).softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).reshape(T, H * D)
    q_pad = torch.cat((q, q.new_zeros(1, H, D)))[meta.query_index]  # [B*Q, H, D]
    # Fold the query heads that share a KV head into the query axis: GQA without repeating K/V.
    q_pad = q_pad.view(B, Q, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * Q, D)
    out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=meta.mask, scale=scale)
    out = out.view(B, KVH, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H * D)
    return out[meta.out_index]
