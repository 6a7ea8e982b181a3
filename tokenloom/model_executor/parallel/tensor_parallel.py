"""Tensor parallelism (Megatron's split): q/k/v and gate/up are column-parallel (each rank computes its heads and
its slice of the MLP's intermediate units), o_proj and down_proj row-parallel (each rank multiplies its slice of
the inputs; one all-reduce after attention and one after the MLP joins the partial sums), the token embedding and
LM head vocabulary-parallel.

Heads are split by key/value head, each rank taking whole GQA groups, as evenly as the counts allow (the default
model's 3 KV heads over 2 ranks: 2 and 1), so every query head sits with its key/value head. The MLP's
intermediate units are split in runs of the largest GGUF block (256, else 32) that divides them, so a row-parallel
quantized matrix is cut on block boundaries. The plan says which rows (column-parallel) or columns (row-parallel)
of each projection a rank keeps; float weights are sliced here, a GGUF file's blocks as they are read
(quant.gguf_linear), and int8/int4 quantization then runs on the slices.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.model_executor.layers.linear import Linear

COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def split_evenly(n: int, parts: int, rank: int, unit: int = 1) -> range:
    """Rank's contiguous share of range(n) cut into `parts` runs of whole units, the first ranks taking one unit
    more when they do not divide evenly."""
    units = n // unit
    base, extra = divmod(units, parts)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return range(start * unit, stop * unit)


class TensorParallelPlan:
    """What one rank of a tensor-parallel group keeps of each weight."""

    def __init__(self, cfg: ModelConfig, rank: int, size: int):
        if cfg.num_experts:
            raise TokenloomError("tensor parallelism over mixture-of-experts layers is not supported yet")
        if cfg.num_kv_heads < size:
            raise TokenloomError(f"tensor_parallel_size {size} is more than the model's {cfg.num_kv_heads} "
                                 f"key/value heads")
        self.cfg, self.rank, self.size = cfg, rank, size
        group = cfg.num_heads // cfg.num_kv_heads
        self.kv_heads = split_evenly(cfg.num_kv_heads, size, rank)
        self.q_heads = range(self.kv_heads.start * group, self.kv_heads.stop * group)
        unit = next(u for u in (256, 32, 1) if cfg.intermediate_size % (u * size) == 0 or u == 1)
        self.intermediate = split_evenly(cfg.intermediate_size, size, rank, unit)
        self.vocab_shard = -(-cfg.vocab_size // size)  # rows per rank (the last may hold fewer)
        self.vocab = range(min(rank * self.vocab_shard, cfg.vocab_size),
                           min((rank + 1) * self.vocab_shard, cfg.vocab_size))

    def _heads_rows(self, heads: range) -> range:
        d = self.cfg.head_dim
        return range(heads.start * d, heads.stop * d)

    def rows(self, leaf: str, part: int) -> range | None:
        """Rows a rank keeps of part `part` (q, k, v / gate, up) of a column-parallel module; None: all."""
        if leaf == "qkv_proj":
            return self._heads_rows(self.q_heads if part == 0 else self.kv_heads)
        if leaf == "gate_up_proj":
            return self.intermediate
        if leaf in ("lm_head", "embed_tokens"):
            return self.vocab
        return None

    def columns(self, leaf: str) -> range | None:
        """Input columns a rank keeps of a row-parallel module; None: all."""
        if leaf == "o_proj":
            return self._heads_rows(self.q_heads)
        if leaf == "down_proj":
            return self.intermediate
        return None

    def local_config(self) -> ModelConfig:
        """The model config as this rank's layers see it (its heads and MLP units; the vocabulary stays whole,
        since the LM head gathers it)."""
        return dataclasses.replace(self.cfg, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
                                   intermediate_size=len(self.intermediate))

    def part_sizes(self, leaf: str) -> list[int]:
        cfg = self.cfg
        if leaf == "qkv_proj":
            return [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
        return [cfg.intermediate_size] * 2


def _named_projections(model):
    """(layer index, dotted name under the model, leaf name, module) of every attention / MLP projection."""
    for i, layer in enumerate(model.layers):
        for owner in ("self_attn", "mlp"):
            block = getattr(layer, owner, None)
            for leaf in COLUMN_PARALLEL + ROW_PARALLEL:
                module = getattr(block, leaf, None) if block is not None else None
                if module is not None:
                    yield i, f"layers.{i}.{owner}.{leaf}", leaf, module


@torch.no_grad()
def slice_float_weights(model, plan: TensorParallelPlan) -> None:
    """Cut every float Linear (and the float embedding) of the model down to this rank's share, in place. Modules
    already built from this rank's share (GGUF blocks read through the plan) are left as they are."""
    for _, _, leaf, module in _named_projections(model):
        if isinstance(module, Linear) and module.holds_float_weight and not getattr(module, "tp_sliced", False):
            if leaf in COLUMN_PARALLEL:
                _slice_rows(module, [plan.rows(leaf, p) for p in range(len(plan.part_sizes(leaf)))],
                            plan.part_sizes(leaf))
            else:
                _slice_columns(module, plan.columns(leaf))
    emb, head = model.embed_tokens, model.lm_head
    tied = isinstance(head, Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight
    if isinstance(emb, nn.Embedding) and not getattr(emb, "tp_sliced", False):
        emb.weight = nn.Parameter(emb.weight.data[plan.vocab.start : plan.vocab.stop].clone(), requires_grad=False)
        emb.num_embeddings, emb.tp_sliced = len(plan.vocab), True
    if isinstance(head, Linear) and head.holds_float_weight and not getattr(head, "tp_sliced", False):
        if tied:
            head.weight = emb.weight
            head.out_features, head.tp_sliced = len(plan.vocab), True
        else:
            _slice_rows(head, [plan.vocab], [plan.cfg.vocab_size])


def _slice_rows(module: Linear, keep: list[range], sizes: list[int]) -> None:
    index = torch.cat([torch.arange(r.start, r.stop) + sum(sizes[:p]) for p, r in enumerate(keep)])
    module.weight = nn.Parameter(module.weight.data[index].clone(), requires_grad=False)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[index].clone(), requires_grad=False)
    module.out_features, module.tp_sliced = len(index), True


def _slice_columns(module: Linear, keep: range) -> None:
    module.weight = nn.Parameter(module.weight.data[:, keep.start : keep.stop].clone(), requires_grad=False)
    module.in_features, module.tp_sliced = len(keep), True


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the ranks (one all-reduce), then the
    bias once."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.bias = inner.bias
        inner.bias = None
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        # partial sums add up in float32, as one rank's kernels accumulate (bf16 partials would round twice)
        total = self.group.all_reduce(y.float().contiguous())
        if self.bias is not None:
            total += self.bias.float()
        return total.to(y.dtype)


class VocabParallelEmbedding(nn.Module):
    """Each rank looks up the ids in its vocabulary rows (zeros for the others'); an all-reduce sums the rows."""

    def __init__(self, inner: nn.Module, vocab: range, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.start, self.stop = vocab.start, vocab.stop

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        rows = self.inner(torch.where(mine, ids - self.start, torch.zeros_like(ids)))
        rows = rows * mine.unsqueeze(-1).to(rows.dtype)
        return self.group.all_reduce(rows.contiguous())


class VocabParallelHead(nn.Module):
    """Each rank's logits over its vocabulary rows, gathered into the whole vocabulary (shards padded to one size
    for the all-gather, cut after)."""

    def __init__(self, inner: nn.Module, vocab_size: int, shard: int, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.vocab_size, self.shard = vocab_size, shard
        self.in_features, self.out_features = inner.in_features, vocab_size

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x)
        if local.shape[-1] < self.shard:
            local = F.pad(local, (0, self.shard - local.shape[-1]))
        return torch.cat(self.group.all_gather(local.contiguous()), dim=-1)[..., : self.vocab_size]


def parallelize(model, plan: TensorParallelPlan, group) -> None:
    """Wrap the sliced model's layers with the collectives that join the ranks, and give its attention layers and
    config this rank's head counts. Call after every weight has its final (sliced, quantized) module."""
    local = plan.local_config()
    for _, name, leaf, module in list(_named_projections(model)):
        if leaf in ROW_PARALLEL:
            owner = model.get_submodule(name.rpartition(".")[0])
            setattr(owner, leaf, RowParallel(module, group))
    for layer in model.layers:
        attn = layer.self_attn
        attn.num_heads, attn.num_kv_heads = local.num_heads, local.num_kv_heads
        attn.q_size, attn.kv_size = local.num_heads * local.head_dim, local.num_kv_heads * local.head_dim
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, plan.vocab, group)
    model.lm_head = VocabParallelHead(model.lm_head, plan.cfg.vocab_size, plan.vocab_shard, group)
    model.global_config, model.config = plan.cfg, local
