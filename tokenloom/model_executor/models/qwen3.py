"""Qwen3: the Llama decoder with an RMSNorm over each head of q and of k (before the rotary embedding), a head
size of its own (config head_dim, not hidden / heads) and no q/k/v bias unless config.attention_bias."""
from __future__ import annotations

import torch

from tokenloom.config import ModelConfig
from tokenloom.model_executor.layers.norm import RMSNorm
from tokenloom.model_executor.layers.rotary import apply_rotary_
from tokenloom.model_executor.models.llama import Attention, CausalLM, DecoderLayer


class Qwen3Attention(Attention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return qk_normed_rotated_qkv(self, x, cos, sin)


def qk_normed_rotated_qkv(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, H, D], k and v [T, KVH, D] with attn.q_norm / attn.k_norm over each head, then the rotary embedding
    (Qwen3, Gemma 3)."""
    T, H, KVH, D = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    # Rows of head_dim values: the fused RMSNorm kernel's shape (a contiguous copy, rotated in place).
    q = apply_rotary_(attn.q_norm(q.reshape(T * H, D)).view(T, H * D), cos, sin, H, D)
    k = apply_rotary_(attn.k_norm(k.reshape(T * KVH, D)).view(T, KVH * D), cos, sin, KVH, D)
    return q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(CausalLM):
    layer_cls = Qwen3DecoderLayer
    hf_config_defaults = {"use_sliding_window": False}
    gguf_tensor_names = CausalLM.gguf_tensor_names.extended(
        layers={"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}, permuted_qk=False)
