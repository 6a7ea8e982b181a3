"""Qwen3-MoE: the Qwen3 decoder (per-head q/k norms) with the sparse experts of Qwen2-MoE (models/qwen2_moe.py's
QwenMoE), without a shared expert."""
from __future__ import annotations

from tokenloom.model_executor.models.qwen2_moe import QwenMoE
from tokenloom.model_executor.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(QwenMoE, Qwen3ForCausalLM):
    # transformers' Qwen3MoeConfig defaults
    hf_config_defaults = {"use_sliding_window": False, "norm_topk_prob": False, "num_experts": 128,
                          "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1}
    gguf_tensor_names = Qwen3ForCausalLM.gguf_tensor_names.extended(layers=QwenMoE.gguf_layers,
                                                                     experts=QwenMoE.gguf_experts)
