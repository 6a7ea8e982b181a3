"""Llama-family decoder (Llama 1-3, SmolLM2, Mistral, Qwen2, Mixtral MoE) over a flat batch of tokens.

Tokens of all scheduled sequences are flattened into one [T, hidden] batch so every projection is a single
matrix multiply; only attention looks at sequence boundaries, through AttentionMetadata.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.model_executor.layers.attention import AttentionMetadata, paged_attention
from tokenloom.model_executor.layers.moe import SparseMoE
from tokenloom.model_executor.layers.norm import RMSNorm
from tokenloom.model_executor.layers.rotary import RotaryEmbedding, apply_rotary_qk_


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v share one matrix multiply.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        # Llama's attention_bias covers the output projection too; Qwen2's q/k/v bias does not.
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias and cfg.architecture == "llama")
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata):
        T = x.shape[0]
        qkv = apply_rotary_qk_(self.qkv_proj(x), cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.num_experts:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, kv_cache, meta):
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        h, x = self.post_attention_layernorm(h, residual=x)  # x += attention output, normalised in one pass
        return x + self.mlp(h)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [T, hidden] of the flat token batch."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- weights -------------------------------------------------------------------------------------
    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load transformers-named tensors, fusing q/k/v, gate/up and the experts as they arrive."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for name, tensor in weights:
            target, shard = _map_hf_name(name)
            if target is None:
                continue
            if target == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if target not in params:
                raise TokenloomError(f"checkpoint tensor '{name}' does not fit this architecture")
            param = params[target]
            dst = param.data if shard is None else _shard_view(param.data, shard, self.config)
            if dst.shape != tensor.shape:
                raise TokenloomError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            seen.add(f"{target}:{shard}")
        expected = _expected_keys(self)
        missing = expected - seen
        if missing:
            raise TokenloomError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[0].split(':')[0]}")


def _map_hf_name(name: str) -> tuple[str | None, tuple | None]:
    """transformers parameter name -> (our parameter name, which shard of a fused tensor)."""
    if "rotary_emb" in name:
        return None, None
    name = name.removeprefix("model.")
    for proj, idx in (("q_proj", 0), ("k_proj", 1), ("v_proj", 2)):
        if f"self_attn.{proj}." in name:
            return name.replace(proj, "qkv_proj"), ("qkv", idx)
    for proj, idx in (("gate_proj", 0), ("up_proj", 1)):
        if f"mlp.{proj}." in name:
            return name.replace(proj, "gate_up_proj"), ("gate_up", idx)
    if ".block_sparse_moe." in name:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if ".experts." in name:  # layers.N.mlp.experts.J.w1.weight
            head, rest = name.split(".experts.")
            j, w, _ = rest.split(".")
            if w == "w2":
                return f"{head}.experts_w2", ("expert", int(j))
            return f"{head}.experts_w13", ("expert13", int(j), 0 if w == "w1" else 1)
    return name, None


def _shard_view(data: torch.Tensor, shard: tuple, cfg: ModelConfig) -> torch.Tensor:
    kind = shard[0]
    if kind == "qkv":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return data.split([q, kv, kv], dim=0)[shard[1]]
    if kind == "gate_up":
        return data.chunk(2, dim=0)[shard[1]]
    if kind == "expert":
        return data[shard[1]]
    if kind == "expert13":
        return data[shard[1]].chunk(2, dim=0)[shard[2]]
    raise AssertionError(kind)


def _expected_keys(model: CausalLM) -> set[str]:
    cfg = model.config
    keys = set()
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "qkv_proj" in name:
            keys |= {f"{name}:('qkv', {i})" for i in range(3)}
        elif "gate_up_proj" in name:
            keys |= {f"{name}:('gate_up', {i})" for i in range(2)}
        elif name.endswith("experts_w2"):
            keys |= {f"{name}:('expert', {j})" for j in range(cfg.num_experts)}
        elif name.endswith("experts_w13"):
            keys |= {f"{name}:('expert13', {j}, {i})" for j in range(cfg.num_experts) for i in range(2)}
        else:
            keys.add(f"{name}:None")
    return keys
