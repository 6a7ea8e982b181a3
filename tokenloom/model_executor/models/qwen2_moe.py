"""Qwen2-MoE: the Qwen2 decoder (q/k/v bias) with sparse experts (layers/moe.py) in the layers that
config.is_moe_layer names (decoder_sparse_step, mlp_only_layers; the others keep a dense MLP), each block with a
shared expert every token takes, weighted by sigmoid(shared_expert_gate(x)); the chosen experts' weights are
renormalised only with norm_topk_prob. QwenMoE, the part Qwen3-MoE shares, is mixed into the dense model class."""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from tokenloom.config import ModelConfig
from tokenloom.model_executor.layers.moe import SparseMoE
from tokenloom.model_executor.models.llama import GatedMLP
from tokenloom.model_executor.models.qwen2 import Qwen2ForCausalLM


class QwenMoE:
    """Sparse experts for a Qwen decoder class (mixed in before it), under transformers' names: mlp.gate (the
    router), mlp.experts.<j>.{gate,up,down}_proj, mlp.shared_expert.*, mlp.shared_expert_gate."""

    has_shared_expert = False
    hf_renamed_modules: dict[str, str] = {}
    packed_experts_mapping = {"experts_w13": ["gate_proj", "up_proj"], "experts_w2": ["down_proj"]}
    gguf_layers = {"ffn_gate_inp": "mlp.gate"}
    gguf_experts = {"ffn_gate": "mlp.experts.{j}.gate_proj", "ffn_up": "mlp.experts.{j}.up_proj",
                    "ffn_down": "mlp.experts.{j}.down_proj"}

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        # dense layers first (no Mixtral block built only to be replaced), then the sparse ones where due
        super().__init__(dataclasses.replace(cfg, num_experts=0), max_positions)
        self.config = cfg
        for i, layer in enumerate(self.layers):
            if cfg.is_moe_layer(i):
                shared = None
                if self.has_shared_expert:
                    shared = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
                layer.mlp = SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                      cfg.num_experts_per_tok, cfg.norm_topk_prob, shared)

    def packed_sizes(self, fused: str) -> list[int]:
        if fused == "experts_w13":
            return [self.config.moe_intermediate_size] * 2
        return super().packed_sizes(fused)

    def checkpoint_parts(self, module: str) -> list[tuple[str, int]]:
        if module.endswith("shared_expert.gate_up_proj"):  # a gate_up_proj of the shared expert's own size
            head, rows = module.rpartition(".")[0], self.config.shared_expert_intermediate_size
            return [(self.checkpoint_module(f"{head}.{p}"), rows) for p in ("gate_proj", "up_proj")]
        return super().checkpoint_parts(module)

    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]], deferred: frozenset[str] = frozenset()
                        ) -> None:
        # llama.cpp may keep shared_expert_gate as a vector [hidden] (transformers' GGUF loader reshapes it too)
        weights = ((n, t.view(1, -1) if t.dim() == 1 and n.endswith("shared_expert_gate.weight") else t)
                   for n, t in weights)
        super().load_hf_weights(weights, deferred)


class Qwen2MoeForCausalLM(QwenMoE, Qwen2ForCausalLM):
    has_shared_expert = True
    # transformers' Qwen2MoeConfig defaults: q/k/v bias (qkv_bias), no renormalisation, every layer sparse
    hf_config_defaults = {"qkv_bias": True, "use_sliding_window": False, "norm_topk_prob": False, "num_experts": 60,
                          "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1}
    gguf_tensor_names = Qwen2ForCausalLM.gguf_tensor_names.extended(
        layers={**QwenMoE.gguf_layers, "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                "ffn_down_shexp": "mlp.shared_expert.down_proj"},
        experts=QwenMoE.gguf_experts)
