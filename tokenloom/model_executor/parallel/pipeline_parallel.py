"""Pipeline parallelism: the decoder layers cut into consecutive stages, one per rank. A rank keeps the layers of
its stage and drops the others' weights; the hidden states (the residual stream) go to the next stage after its
last layer and, from the last stage, back to rank 0, which holds the token embedding, the final norm and the LM
head (tied models keep one matrix) and so samples, as the engine's own rank.

Every model's forward stays as it is (embedding, each layer in turn, final norm): the layers outside a stage
become pass-throughs, the stage's first layer first receives its input, its last layer sends its output on.
"""
from __future__ import annotations

import torch
from torch import nn

from tokenloom.model_executor.parallel.tensor_parallel import split_evenly


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The layers of stage pp_rank (earlier stages take one more when the counts do not divide evenly)."""
    return split_evenly(num_layers, pp_size, pp_rank)


class _NoAttention:
    kv_cache = None  # another stage's layer keeps no KV cache here
    sliding_window = None


class OtherStageLayer(nn.Module):
    """A layer of another stage: the hidden states pass through unchanged (and its weights are not held)."""

    def __init__(self):
        super().__init__()
        self.self_attn = _NoAttention()

    def forward(self, x, *args, **kwargs):
        return x


class _Wrapped(nn.Module):
    """A stage's layer with a transfer before or after it; the model still reaches its attention (KV binding)."""

    def __init__(self, layer: nn.Module, group, peer: int):
        super().__init__()
        self.layer, self.group, self.peer = layer, group, peer

    @property
    def self_attn(self):
        return self.layer.self_attn


class ReceiveThen(_Wrapped):
    """The stage's first layer: takes the hidden states from rank `peer` in place of its input, then runs.
    `deferred`: pass the input through instead (rank 0 receives the last stage's micro-batches itself)."""

    deferred = False

    def forward(self, x, *args, **kwargs):
        if self.deferred:
            return x
        x = self.group.recv(torch.empty_like(x), self.peer)
        return self.layer(x, *args, **kwargs)


class ThenSend(_Wrapped):
    """The stage's last layer: runs, then sends its output to rank `peer`."""

    def forward(self, x, *args, **kwargs):
        y = self.layer(x, *args, **kwargs)
        self.group.send(y, self.peer)
        return y


class MissingEmbedding(nn.Module):
    """Stages after the first hold no embedding: zeros of the right shape start their (pass-through) run."""

    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.dim, self.dtype = dim, dtype
        self.weight = torch.empty(0, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


def make_pipeline_stage(model, pp_rank: int, pp_size: int, group) -> range:
    """Turn the loaded model into stage pp_rank of pp_size (rank r of the group is stage r); returns the stage's
    layers. Rank 0 also receives the last stage's output at the end of its run, so its forward returns the
    model's final hidden states."""
    n = len(model.layers)
    mine = stage_layers(n, pp_size, pp_rank)
    if pp_size == 1:
        return mine
    model.pipeline_layers = mine  # the runner gives only these layers a KV cache
    if len(mine) == 0:
        raise ValueError(f"pipeline stage {pp_rank} has no layers ({n} layers over {pp_size} stages)")
    for i in range(n):
        if i not in mine:
            model.layers[i] = OtherStageLayer()
    if pp_rank > 0:
        model.layers[mine.start] = ReceiveThen(model.layers[mine.start], group, pp_rank - 1)
        model.embed_tokens = MissingEmbedding(model.config.hidden_size, model.norm.weight.dtype)
        model.lm_head = nn.Identity()  # rank 0 computes the logits
    last = mine.stop - 1
    model.layers[last] = ThenSend(model.layers[last], group, (pp_rank + 1) % pp_size)
    if pp_rank == 0:  # the final stage's output arrives where rank 0's pass-throughs end
        model.layers[n - 1] = model.pipeline_tail = ReceiveThen(model.layers[n - 1], group, pp_size - 1)
    return mine
