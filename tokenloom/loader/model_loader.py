"""Build a model and its tokenizer from a resolved source (HF safetensors directory or GGUF file)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.loader.sources import ModelSource
from tokenloom.models.llama import CausalLM
from tokenloom.layers.rotary import RotaryEmbedding


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TokenloomError(f"no *.safetensors weights in '{path}'")
    for f in files:
        if not f.is_file():
            raise TokenloomError(f"missing weight shard '{f}'")
    return files


def iter_safetensors(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time from memory-mapped files: only the runtime copy is ever fully in RAM."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        except TokenloomError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError on corrupt headers / short files
            raise TokenloomError(f"cannot read '{file}': corrupt or truncated safetensors file ({exc})") from None


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg, max_positions)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg, max_positions).to(device)
    return model.eval()


def load_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenloomError(f"cannot read '{cfg_file}': {exc}") from None


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int | None = None):
    """Returns (model, tokenizer)."""
    raw_config: dict = {}
    if source.kind == "hf_dir":
        raw_config = load_hf_config(source.path)
        cfg = ModelConfig.from_hf(raw_config)
        # A directory without tokenizer files still runs on token ids (as vLLM's skip_tokenizer_init).
        has_tok = (source.path / "tokenizer.json").is_file()
        tokenizer = None
        if has_tok:
            from tokenloom.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_hf_dir(source.path)
        weights = iter_safetensors(source.path, dtype)
    else:
        from tokenloom.loader.gguf_loader import load_gguf

        cfg, state_dict, metadata = load_gguf(str(source.path), dtype)
        from tokenloom.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        weights = iter(state_dict.items())
    if tokenizer is not None:  # generation_config / tokenizer may declare more end-of-turn ids than config
        cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *tokenizer.eos_token_ids]))
    max_positions = max_positions or cfg.max_position_embeddings
    model = build_model(cfg, dtype, device, max_positions)
    if "quantization_config" in raw_config:  # GPTQ / AWQ / tokenloom-quantized directory
        from tokenloom.quant.checkpoint import load_quantized

        load_quantized(model, source.path, raw_config["quantization_config"], dtype)
    else:
        model.load_hf_weights(weights)
    return model, tokenizer
