"""The per-step forward context (as nano-vllm's utils/context.py): what every layer of one forward pass shares,
set by the caller around the model call instead of passed through every forward signature.

    with set_forward_context(ForwardContext(attn_metadata)):
        hidden = model(input_ids, positions)

Each attention layer reads the step's metadata from here and its own KV cache from itself (bound once by
model.bind_kv_caches); LoRA layers read which rows run with which adapter slot. The context is per thread: a
model's forwards run on its engine thread, and several models may run at once.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from tokenloom.model_executor.layers.attention import AttentionMetadata


@dataclass
class LoRAMapping:
    """The step's token rows by the adapter slot they run with (rows of the base model are in none): `runs`
    [G, 3] int64 (slot, first row, end row) for the compiled kernel, and per slot a `group` for the torch code,
    one run of rows (a slice) when its requests sit next to each other in the batch, else their indices."""
    runs: torch.Tensor
    groups: list[tuple[int, slice | torch.Tensor]]

    @classmethod
    def from_spans(cls, spans: list[tuple[int, int, int]], device: torch.device | None = None) -> "LoRAMapping":
        """From (slot, first row, end row) spans, in row order."""
        by_slot: dict[int, list[list[int]]] = {}
        for slot, start, end in spans:
            runs = by_slot.setdefault(slot, [])
            if runs and runs[-1][1] == start:
                runs[-1][1] = end  # adjacent requests of one adapter: one run
            else:
                runs.append([start, end])
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for slot, runs in by_slot.items():
            if len(runs) == 1:
                groups.append((slot, slice(runs[0][0], runs[0][1])))
            else:
                groups.append((slot, torch.cat([torch.arange(a, b) for a, b in runs]).to(device)))
        flat = [[slot, a, b] for slot, runs in by_slot.items() for a, b in runs]
        return cls(torch.tensor(flat, dtype=torch.long).reshape(-1, 3), groups)


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    lora: LoRAMapping | None = None  # None: every row runs the base weights
    # [T] prompt length of each row's sequence (LongRoPE picks its factors by it); None: rows taken as past it
    prompt_lens: torch.Tensor | None = None


# Per thread: a server runs several models, each forward on its own engine thread, at the same time.
_LOCAL = threading.local()


def _current() -> ForwardContext | None:
    return getattr(_LOCAL, "context", None)


def get_forward_context() -> ForwardContext:
    ctx = _current()
    if ctx is None:
        raise RuntimeError("the model runs inside `with set_forward_context(...)` (model_executor.forward_context)")
    return ctx


def current_lora_mapping() -> LoRAMapping | None:
    """The adapter groups of the forward running now (None outside a forward, or with no adapter rows)."""
    ctx = _current()
    return None if ctx is None else ctx.lora


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    previous, _LOCAL.context = _current(), ctx
    try:
        yield ctx
    finally:
        _LOCAL.context = previous


@contextmanager
def bound_kv_caches(model, caches) -> Iterator[None]:
    """Bind `caches` (one LayerKVCache per layer) to the model's attention layers for the duration, then put the
    previous ones back: scratch forwards (calibration, perplexity, embeddings) leave the engine's cache bound."""
    previous = model.bind_kv_caches(caches)
    try:
        yield
    finally:
        model.bind_kv_caches(previous)
