"""Gemma 2: the Llama decoder with Gemma's changes, after transformers' Gemma2ForCausalLM: embeddings scaled by
sqrt(hidden), RMSNorms scaling by (1 + weight), a norm after attention and one after the MLP as well as before
them, a GeGLU MLP (tanh GELU), the attention scale query_pre_attn_scalar ** -0.5, sliding-window layers
alternating with global ones, and tanh soft-capping of the attention scores and of the final logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.config import ModelConfig
from tokenloom.gguf.loader import GGUFTensorNames
from tokenloom.model_executor.forward_context import get_forward_context
from tokenloom.model_executor.layers.attention import paged_attention
from tokenloom.model_executor.layers.norm import GemmaRMSNorm
from tokenloom.model_executor.models.llama import Attention, CausalLM, GatedMLP

GEMMA_GGUF_LAYERS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


class GeGLUMLP(GatedMLP):
    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma2Attention(Attention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcapping
        self.sliding_window = cfg.sliding_window  # this layer's: set by the model (ModelConfig.layer_window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.rotated_qkv(x, cos, sin)
        meta = get_forward_context().attn_metadata.for_window(self.sliding_window)
        return self.o_proj(paged_attention(q, k, v, self.kv_cache, meta, self.scale, self.softcap))


class Gemma2DecoderLayer(nn.Module):
    attention_cls = Gemma2Attention

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = self.attention_cls(cfg)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = GeGLUMLP(hidden, cfg.intermediate_size)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x, cos, sin):
        h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        h, x = self.pre_feedforward_layernorm(h, residual=x)  # x += normed attention output, normed in one pass
        return x + self.post_feedforward_layernorm(self.mlp(h))


class Gemma2ForCausalLM(CausalLM):
    layer_cls = Gemma2DecoderLayer
    # Gemma2Config's defaults, for config.json files that leave them out (sliding_window_pattern: every 2nd
    # layer global, as transformers and llama.cpp lay them out)
    hf_config_defaults = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "sliding_window": 4096, "sliding_window_pattern": 2, "head_dim": 256, "rms_norm_eps": 1e-6,
                          "tie_word_embeddings": True}
    # llama.cpp neither permutes q/k nor keeps Gemma's norm weights as they are: it adds 1 to them
    gguf_tensor_names = GGUFTensorNames(
        globals={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
        layers=GEMMA_GGUF_LAYERS, permuted_qk=False, norm_offset=1.0)

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__(cfg, max_positions)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            layer.self_attn.sliding_window = cfg.layer_window(i)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # the scale rounded to the model's dtype first, as transformers does (sqrt(640) is 25.25 in bfloat16); as a
        # Python number (the same products), so no host value is copied to the device mid-forward (CUDA graphs)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype).item()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
