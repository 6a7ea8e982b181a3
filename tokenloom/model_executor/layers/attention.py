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

from tokenloom.kernels import cpu_ops


# Above this many attention scores (B*H*Q*L) a batch goes through the flash kernel, which never holds them all.
MATMUL_ATTENTION_MAX_SCORES = 1 << 23


@dataclass
class AttentionBatch:
    """Sequences attended together, padded to B sequences x Q query rows x L context keys. A step splits into at
    most two: its decodes (Q == 1, the fused kernel's case) and the rest (prefill chunks), so one long prompt
    does not pad every decode in the step to its length."""

    token_rows: torch.Tensor | None  # rows of the step's flat batch in this batch (None: all, in order)
    query_index: torch.Tensor  # [B*Q] row of the batch's own tokens (its token count = an all-zero pad row)
    key_slots: torch.Tensor  # [B, L] cache slot of each context position (pad: slot 0, masked)
    mask: torch.Tensor  # [B, 1, G*Q, L] bool, True = attend (already expanded over the GQA group G)
    out_index: torch.Tensor  # [tokens] row of the padded output holding each token's result
    num_seqs: int
    max_query_len: int
    # What the fused decode kernel reads instead of key_slots/mask: block tables and each sequence's key range.
    block_table: torch.Tensor  # [B, max_blocks]
    context_lens: torch.Tensor  # [B]
    key_start: torch.Tensor  # [B] first position attended (sliding window), else 0
    block_size: int
    key_rows: torch.Tensor | None = None  # [B*KVH*L] rows of the cache viewed as [slot*KVH, D]; made by layer 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    batches: list[AttentionBatch]
    # Single sequence prefilled from position 0: plain causal attention over the new tokens, no gather.
    causal_only: bool = False


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
    T = sum(query_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    offsets = torch.cumsum(q_lens, 0) - q_lens
    # Slots of the new tokens (flattened over sequences).
    width = max(len(bt) for bt in block_tables)
    table = torch.tensor([bt + [0] * (width - len(bt)) for bt in block_tables], dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(B), q_lens)
    tok_pos = torch.arange(T) - offsets[seq_of_token] + (torch.tensor(context_lens) - q_lens)[seq_of_token]
    slot_mapping = (table[seq_of_token, tok_pos // block_size] * block_size + tok_pos % block_size).to(device)

    if B == 1 and context_lens[0] == query_lens[0] and (sliding_window is None or T <= sliding_window):
        return AttentionMetadata(slot_mapping, [], causal_only=True)
    decodes = [i for i, q in enumerate(query_lens) if q == 1]
    if not decodes or len(decodes) == B:
        groups = [list(range(B))]
    else:
        groups = [decodes, [i for i, q in enumerate(query_lens) if q > 1]]
    batches = []
    for seqs in groups:
        rows = None
        if len(groups) > 1:
            rows = torch.cat([torch.arange(offsets[i], offsets[i] + query_lens[i]) for i in seqs]).to(device)
        batches.append(_build_batch([query_lens[i] for i in seqs], [context_lens[i] for i in seqs],
                                    table[seqs] if len(groups) > 1 else table, rows, block_size, group_size,
                                    sliding_window, device))
    return AttentionMetadata(slot_mapping, batches)


def _build_batch(query_lens, context_lens, table, token_rows, block_size, group_size, sliding_window,
                 device) -> AttentionBatch:
    B, Q, L, T = len(query_lens), max(query_lens), max(context_lens), sum(query_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    ctx_lens = torch.tensor(context_lens, dtype=torch.long)
    start = ctx_lens - q_lens  # position of each sequence's first new token
    seq_of_token = torch.repeat_interleave(torch.arange(B), q_lens)
    offsets = torch.cumsum(q_lens, 0) - q_lens

    key_pos = torch.arange(L)
    key_slots = table[:, (key_pos // block_size).clamp(max=table.shape[1] - 1)] * block_size + key_pos % block_size
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
    key_start = (ctx_lens - sliding_window).clamp(min=0) if sliding_window is not None else torch.zeros_like(ctx_lens)
    return AttentionBatch(
        token_rows, query_index.to(device), key_slots.to(device), mask.to(device), out_index.to(device), B, Q,
        table.to(device), ctx_lens.to(device), key_start.to(device), block_size,
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
    cache.write(meta.slot_mapping, k, v)
    if meta.causal_only:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale,
            enable_gqa=H > k.shape[1],
        )
        return out.transpose(0, 1).reshape(T, H * D)
    if len(meta.batches) == 1:
        return _attend(q, cache, meta.batches[0], scale)
    out = q.new_empty(T, H * D)
    for b in meta.batches:
        out[b.token_rows] = _attend(q[b.token_rows], cache, b, scale)
    return out


def _attend(q: torch.Tensor, cache: LayerKVCache, meta: AttentionBatch, scale: float) -> torch.Tensor:
    """Attention of one batch's query tokens [tokens, H, D] over their sequences' cached context (their own new
    K/V already written)."""
    T, H, D = q.shape
    KVH = cache.k.shape[1]
    G = H // KVH
    B, Q = meta.num_seqs, meta.max_query_len
    if Q == 1 and cache.k_scale is None and cache.k.dtype == q.dtype and D % 16 == 0 and (ops := cpu_ops.ops_for(q)):
        # pure decode: read K/V straight from the paged cache (no gather, padding or mask)
        return ops.paged_decode_attention(q, cache.k, cache.v, meta.block_table, meta.block_size,
                                          meta.context_lens, meta.key_start, scale)
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
    if B * H * Q * L <= MATMUL_ATTENTION_MAX_SCORES:
        # Plain batched matmuls and a float32 softmax: several times faster than the CPU flash kernel with a mask
        # at these sizes (the score matrix is small).
        scores = torch.matmul(q_pad, keys.transpose(-1, -2)).float() * scale  # [B, KVH, G*Q, L]
        probs = scores.masked_fill_(~meta.mask, float("-inf")).softmax(-1).to(q.dtype)
        out = torch.matmul(probs, values)
    else:
        out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=meta.mask, scale=scale)
    if Q == 1:
        return out.reshape(T, H * D)
    out = out.view(B, KVH, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H * D)
    return out[meta.out_index]
