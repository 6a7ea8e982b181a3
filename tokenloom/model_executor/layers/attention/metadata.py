"""A step's attention metadata: index tensors built once per step and shared by every layer.

A step's tokens (prefill chunks and decodes of many sequences, flattened) write their K/V into their cache slots,
then each sequence attends over its own context by gathering the slots its block table names. The gather indices
and masks are built here once, so the per-layer work is tensor ops only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenloom.kernels.transfer import to_device


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
    additive_mask: torch.Tensor | None = None  # mask as SDPA adds it (0 / -inf, q's dtype); made by layer 0

    def sdpa_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive one, made once for the step's layers: given the boolean mask, SDPA converts
        it itself in every call (a `where` over [B, G*Q, L] per layer, 40 % of a long chunked prefill)."""
        if self.additive_mask is None or self.additive_mask.dtype != dtype:
            self.additive_mask = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf"))
        return self.additive_mask


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    batches: list[AttentionBatch]
    # Single sequence prefilled from position 0: plain causal attention over the new tokens, no gather.
    causal_only: bool = False
    window: int | None = None  # the sliding window the masks apply (None: the whole context)
    # build_attention_metadata's arguments but the window, and the step's metadata for other windows built so far
    step: tuple = field(default=(), repr=False)
    other_windows: dict = field(default_factory=dict, repr=False)

    def for_window(self, window: int | None) -> "AttentionMetadata":
        """This step's metadata for layers attending over another sliding window (Gemma interleaves sliding and
        global layers): built on a layer's first call in the step, then shared by the layers of that window."""
        if window == self.window:
            return self
        if window not in self.other_windows:
            q, ctx, tables, block_size, group_size, device = self.step
            self.other_windows[window] = build_attention_metadata(q, ctx, tables, block_size, group_size, window,
                                                                  device)
        return self.other_windows[window]


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
    slot_mapping = to_device(table[seq_of_token, tok_pos // block_size] * block_size + tok_pos % block_size, device)

    step = (query_lens, context_lens, block_tables, block_size, group_size, device)
    if B == 1 and context_lens[0] == query_lens[0] and (sliding_window is None or T <= sliding_window):
        return AttentionMetadata(slot_mapping, [], causal_only=True, window=sliding_window, step=step)
    decodes = [i for i, q in enumerate(query_lens) if q == 1]
    if not decodes or len(decodes) == B:
        groups = [list(range(B))]
    else:
        groups = [decodes, [i for i, q in enumerate(query_lens) if q > 1]]
    batches = []
    for seqs in groups:
        rows = None
        if len(groups) > 1:
            rows = to_device(torch.cat([torch.arange(offsets[i], offsets[i] + query_lens[i]) for i in seqs]), device)
        batches.append(_build_batch([query_lens[i] for i in seqs], [context_lens[i] for i in seqs],
                                    table[seqs] if len(groups) > 1 else table, rows, block_size, group_size,
                                    sliding_window, device))
    return AttentionMetadata(slot_mapping, batches, window=sliding_window, step=step)


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
        token_rows, *(to_device(t, device) for t in (query_index, key_slots, mask, out_index)), B, Q,
        *(to_device(t, device) for t in (table, ctx_lens, key_start)), block_size,
    )


class StaticDecodeMetadata(AttentionMetadata):
    """A pure-decode step's metadata made by tensor ops alone from fixed-shape tensors (build_decode_metadata):
    its shapes depend only on theirs, never on a value read back to the host, so the ops can be captured in a CUDA
    graph and replayed with new values in those tensors (worker/cuda_graphs.py). Other windows' metadata is made
    the same way, from the same tensors, on a layer's first call."""

    def for_window(self, window: int | None) -> "AttentionMetadata":
        if window == self.window:
            return self
        if window not in self.other_windows:
            context_lens, table, block_size, group_size = self.step
            batch = _decode_batch(context_lens, table, block_size, group_size, window)
            self.other_windows[window] = StaticDecodeMetadata(self.slot_mapping, [batch], window=window,
                                                              step=self.step)
        return self.other_windows[window]


def build_decode_metadata(positions: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                          block_size: int, group_size: int, sliding_window: int | None) -> AttentionMetadata:
    """Metadata of B sequences decoding one token each, from tensors on the device: positions [B] of the new tokens,
    context_lens [B] (position + 1), block_table [B, W] (padded with any block id). Every sequence attends over
    W * block_size keys, the ones at or past its context length masked out, so W sets the cost, not the contexts.
    A pad row (context 1, position 0) writes and reads the first slot of its table's first block."""
    slot_mapping = (block_table.gather(1, (positions // block_size)[:, None])[:, 0] * block_size
                    + positions % block_size)
    batch = _decode_batch(context_lens, block_table, block_size, group_size, sliding_window)
    return StaticDecodeMetadata(slot_mapping, [batch], window=sliding_window,
                                step=(context_lens, block_table, block_size, group_size))


def _decode_batch(context_lens: torch.Tensor, table: torch.Tensor, block_size: int, group_size: int,
                  window: int | None) -> AttentionBatch:
    """_build_batch's decode batch (one query row per sequence) over a fixed W * block_size keys."""
    B, W = table.shape
    key_pos = torch.arange(W * block_size, device=table.device)
    key_slots = table[:, key_pos // block_size] * block_size + key_pos % block_size  # [B, L]
    mask = key_pos[None, :] < context_lens[:, None]  # the query sits at position context_len - 1
    if window is not None:
        key_start = (context_lens - window).clamp(min=0)
        mask &= key_pos[None, :] >= key_start[:, None]
    else:
        key_start = torch.zeros_like(context_lens)
    mask = mask[:, None, None, :].expand(B, 1, group_size, W * block_size)
    rows = torch.arange(B, device=table.device)
    return AttentionBatch(None, rows, key_slots, mask, rows, B, 1, table, context_lens, key_start, block_size)
