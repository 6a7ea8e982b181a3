"""Gemma 3 (text): Gemma 2's decoder (models/gemma2.py) with an RMSNorm over each head of q and of k before the
rotary embedding, a rope base of their own for the sliding-window layers (rope_local_base_freq; rope scaling,
where configured, applies to the global layers only), five sliding layers to a global one by default, and no
soft-capping of the attention scores. After transformers' Gemma3ForCausalLM."""
from __future__ import annotations

import dataclasses

import torch

from tokenloom.config import ModelConfig
from tokenloom.model_executor.layers.norm import GemmaRMSNorm
from tokenloom.model_executor.layers.rotary import RotaryEmbedding
from tokenloom.model_executor.models.gemma2 import Gemma2Attention, Gemma2DecoderLayer, Gemma2ForCausalLM
from tokenloom.model_executor.models.qwen3 import qk_normed_rotated_qkv


class Gemma3Attention(Gemma2Attention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.softcap = None  # transformers and llama.cpp leave Gemma 3's scores uncapped, whatever its config says
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return qk_normed_rotated_qkv(self, x, cos, sin)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    layer_cls = Gemma3DecoderLayer
    # Gemma3TextConfig's defaults (its rope_theta, 1e6, is in every config.json)
    hf_config_defaults = {"query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
                          "rope_local_base_freq": 10000.0, "head_dim": 256, "rms_norm_eps": 1e-6,
                          "tie_word_embeddings": True, "final_logit_softcapping": None,
                          "attn_logit_softcapping": None}
    gguf_tensor_names = Gemma2ForCausalLM.gguf_tensor_names.extended(
        layers={"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"})

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__(cfg, max_positions)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.local_rotary = self._local_rotary()

    def _local_rotary(self) -> RotaryEmbedding:
        cfg = self.config
        local = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta or cfg.rope_theta, rope_scaling=None)
        return RotaryEmbedding(local, self.max_positions)

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        # rope tables are computed, never loaded: made again on the device (as model_loader.build_model does for
        # `rotary`), not left as the empty memory to_empty gives every buffer
        self.local_rotary = self._local_rotary().to(device)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        ropes = {False: self.rotary(positions, x.dtype), True: self.local_rotary(positions, x.dtype)}
        for layer in self.layers:
            x = layer(x, *ropes[layer.self_attn.sliding_window is not None])
        return self.norm(x)
