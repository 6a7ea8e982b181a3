"""Llama-family decoder (Llama 1-3, SmolLM2, Mistral, Mixtral MoE; Qwen2 and Qwen3 subclass it) over a flat batch
of tokens.

Tokens of all scheduled sequences are flattened into one [T, hidden] batch so every projection is a single
matrix multiply; only attention looks at sequence boundaries, through the step's AttentionMetadata, which it
reads from the forward context (model_executor.forward_context) along with its own bound KV cache.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.config import ModelConfig
from tokenloom.gguf.loader import GGUFTensorNames
from tokenloom.model_executor.forward_context import get_forward_context
from tokenloom.model_executor.layers.attention import LayerKVCache, paged_attention
from tokenloom.model_executor.layers.linear import Linear
from tokenloom.model_executor.layers.moe import SparseMoE
from tokenloom.model_executor.layers.norm import RMSNorm
from tokenloom.model_executor.layers.rotary import RotaryEmbedding, apply_rotary_qk_
from tokenloom.model_executor.models.weights import CheckpointNames


class Attention(nn.Module):
    o_proj_bias = True  # config.attention_bias covers the output projection too (Llama, Qwen3; not Qwen2)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v share one matrix multiply.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias and self.o_proj_bias)
        self.scale = cfg.head_dim**-0.5
        self.kv_cache: LayerKVCache | None = None  # this layer's view of the paged cache (bind_kv_caches)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.rotated_qkv(x, cos, sin)
        out = paged_attention(q, k, v, self.kv_cache, get_forward_context().attn_metadata, self.scale)
        return self.o_proj(out)

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [T, H, D], k and v [T, KVH, D] of the tokens x, rotary embedding applied to q and k."""
        T = x.shape[0]
        qkv = apply_rotary_qk_(self.qkv_proj(x), cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                v.view(T, self.num_kv_heads, self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    attention_cls = Attention

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self.attention_cls(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.num_experts:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin):
        h = self.self_attn(self.input_layernorm(x), cos, sin)
        h, x = self.post_attention_layernorm(h, residual=x)  # x += attention output, normalised in one pass
        return x + self.mlp(h)


class CausalLM(CheckpointNames, nn.Module):
    layer_cls = DecoderLayer

    # ---- checkpoint naming (models/weights.py) -----------------------------------------------------------
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_renamed_modules = {"mlp.gate": "block_sparse_moe.gate", "mlp.experts": "block_sparse_moe.experts"}
    packed_experts_mapping = {"experts_w13": ["w1", "w3"], "experts_w2": ["w2"]}  # Mixtral: gate, up / down
    gguf_tensor_names = GGUFTensorNames(
        globals={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
        layers={
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
            "ffn_gate_inp": "block_sparse_moe.gate",
        },
        experts={"ffn_gate": "block_sparse_moe.experts.{j}.w1", "ffn_up": "block_sparse_moe.experts.{j}.w3",
                 "ffn_down": "block_sparse_moe.experts.{j}.w2"},
        permuted_qk=True,
    )

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        # _weight: no random init (built on the meta device, where torch's init routines import its compiler)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(self.layer_cls(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)

    def packed_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            return [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
        if fused == "experts_w2":
            return [cfg.hidden_size]
        return [cfg.intermediate_size] * 2  # gate_up_proj, experts_w13

    def to_empty(self, *, device, recurse: bool = True):
        # torch.empty, not nn.Module's empty_like: empty_like of a meta tensor runs torch's Python reference, whose
        # first use imports sympy (~0.9 s of every cold start)
        return self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), recurse=recurse)

    def bind_kv_caches(self, caches: Sequence[LayerKVCache | None]) -> list[LayerKVCache | None]:
        """Give each attention layer its view of the KV cache (once, when the cache is allocated); returns the
        views bound before."""
        previous = [layer.self_attn.kv_cache for layer in self.layers]
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache
        return previous

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] of the flat token batch (inside set_forward_context)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)  # once per step, shared by every layer
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
