"""The per-step forward context (as nano-vllm's utils/context.py): what every layer of one forward pass shares,
set by the caller around the model call instead of passed through every forward signature.

    with set_forward_context(ForwardContext(attn_metadata)):
        hidden = model(input_ids, positions)

Each attention layer reads the step's metadata from here and its own KV cache from itself (bound once by
model.bind_kv_caches). One forward runs at a time: a model's forwards run on one thread.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from tokenloom.model_executor.layers.attention import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("the model runs inside `with set_forward_context(...)` (model_executor.forward_context)")
    return _CONTEXT


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous


@contextmanager
def bound_kv_caches(model, caches) -> Iterator[None]:
    """Bind `caches` (one LayerKVCache per layer) to the model's attention layers for the duration, then put the
    previous ones back: scratch forwards (calibration, perplexity, embeddings) leave the engine's cache bound."""
    previous = model.bind_kv_caches(caches)
    try:
        yield
    finally:
        model.bind_kv_caches(previous)
