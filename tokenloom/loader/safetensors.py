"""Reading Hugging Face checkpoint directories: config.json and (sharded) safetensors, one tensor at a time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from tokenloom.config import TokenloomError


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


def load_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenloomError(f"cannot read '{cfg_file}': {exc}") from None
