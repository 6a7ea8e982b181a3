"""Build an empty model of a configuration (its class from the registry), on the meta device first so no memory is
touched twice; read GGUF files with the tensor names their model class declares."""
from __future__ import annotations

from typing import Any

import torch

from tokenloom.config import ModelConfig
from tokenloom.gguf.loader import GGUFCheckpoint
from tokenloom.model_executor.layers.rotary import RotaryEmbedding
from tokenloom.model_executor.models.llama import CausalLM
from tokenloom.model_executor.models.registry import model_class, model_class_for_hf


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int) -> CausalLM:
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, max_positions)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg, max_positions).to(device)
    return model.eval()


def config_from_hf(hf_config: dict) -> ModelConfig:
    """ModelConfig of a transformers config.json, with the defaults its architecture's config class implies;
    an unsupported architecture is a clear error."""
    return ModelConfig.from_hf(hf_config, model_class_for_hf(hf_config).hf_config_defaults)


def load_gguf(
    path: str, dtype: torch.dtype = torch.float32, keep_blocks: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a GGUF file of a supported architecture: (config, state dict under checkpoint (transformers) names in
    `dtype`, GGUF metadata as plain Python values); llama.cpp's q/k permutation is undone where it was applied.
    keep_blocks: quantized linear and embedding weights are left out of the state dict (GGUFCheckpoint.state_dict),
    their names in metadata["tokenloom.deferred"]."""
    gguf = GGUFCheckpoint(path)
    cls = model_class(gguf.architecture)
    cfg = gguf.config()
    with torch.device("meta"):
        expected = set(cls(cfg, 1).checkpoint_keys())
    state = gguf.state_dict(cfg, cls.gguf_tensor_names, expected, dtype, keep_blocks)
    gguf.metadata["tokenloom.deferred"] = frozenset(gguf.deferred)
    return cfg, state, gguf.metadata
