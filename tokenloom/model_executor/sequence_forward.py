"""One sequence through the model from position 0, outside the engine: calibration (GPTQ/AWQ), perplexity and
embeddings run whole models or single layers this way, with a scratch KV cache sized for the sequence."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from tokenloom.model_executor.forward_context import ForwardContext, bound_kv_caches, set_forward_context
from tokenloom.model_executor.layers.attention import LayerKVCache, build_attention_metadata


class SequenceForward:
    """Runs a CausalLM (or one decoder layer) over one sequence of tokens starting at position 0, with a scratch
    KV cache sized for it, bound to every layer for the call (the model's own binding is put back after): the
    plain causal path of paged attention (no gather)."""

    BLOCK = 16

    def __init__(self, model, length: int):
        cfg = model.config
        self.model, self.length = model, length
        self.dtype = model.norm.weight.dtype
        device = model.norm.weight.device
        n_blocks = math.ceil(length / self.BLOCK)
        self.context = ForwardContext(build_attention_metadata(
            [length], [length], [list(range(n_blocks))], self.BLOCK, cfg.num_heads // cfg.num_kv_heads,
            cfg.sliding_window, device), prompt_lens=torch.full((length,), length, device=device))
        self.positions = torch.arange(length, device=device)
        self.cache = torch.zeros(2, n_blocks * self.BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype,
                                 device=device)
        self.kv = LayerKVCache(self.cache[0], self.cache[1])
        self._rope = None

    def rope(self):
        if self._rope is None:
            self._rope = self.model.rotary(self.positions, self.dtype)
        return self._rope

    @contextmanager
    def _scratch(self):
        # layers run one after another: one scratch cache serves all
        with bound_kv_caches(self.model, [self.kv] * len(self.model.layers)), set_forward_context(self.context):
            yield

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    @torch.no_grad()
    def layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        with self._scratch():
            return layer(x, *self.rope())

    @torch.no_grad()
    def attention(self, layer, x_normed: torch.Tensor) -> torch.Tensor:
        with self._scratch():
            return layer.self_attn(x_normed, *self.rope())

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [T, hidden]."""
        with self._scratch():
            return self.model(ids, self.positions)


class SequenceRunners(dict):
    """runners[length]: a SequenceForward for sequences of that length, made on first use and then reused."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, length: int) -> SequenceForward:
        self[length] = runner = SequenceForward(self.model, length)
        return runner


def capture_input(module, fn):
    """Run fn() and return the first positional input `module` saw (the last call's)."""
    box = []
    handle = module.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        fn()
    finally:
        handle.remove()
    return box[-1]


