"""Build an empty model of a configuration, on the meta device first so no memory is touched twice."""
from __future__ import annotations

import torch

from tokenloom.config import ModelConfig
from tokenloom.model_executor.models.llama import CausalLM
from tokenloom.model_executor.layers.rotary import RotaryEmbedding


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg, max_positions)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg, max_positions).to(device)
    return model.eval()


