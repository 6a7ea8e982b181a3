"""Checkpoint naming, declared once by each model class (class attributes) and read by every loader.

A model names its parameters its own way (fused q/k/v, stacked MoE experts); checkpoints use transformers'
names. A model class declares the difference:

    hf_prefix, hf_unprefixed   transformers' name of a module is hf_prefix + ours, except these top-level ones
    hf_renamed_modules         ours -> theirs for a dotted run of name parts (MoE blocks)
    packed_modules_mapping     our fused module -> the checkpoint modules stacked along its output dim, in order
                               (as vLLM / nano-vllm); packed_sizes() gives their rows
    packed_experts_mapping     our stacked MoE parameter `experts_<w>` [E, rows, in] -> the checkpoint modules
                               `experts.<j>.<part>` of each expert j it stacks; `experts.<j>.<w>` names one
                               expert's slice as a module (quantized checkpoints)
    gguf_tensor_names          llama.cpp's names (gguf.loader.GGUFTensorNames), passed down to the GGUF loader
    hf_config_defaults         config.json values that transformers' config class of the architecture implies

From these, checkpoint_keys() maps every tensor the model expects to the slice of the parameter it fills, which
is all the safetensors loader needs, and checkpoint_parts() names the checkpoint modules behind one of ours,
which is what the quantized-checkpoint and GGUF-block loaders need.
"""
from __future__ import annotations

from typing import Iterable

import torch

from tokenloom.config import TokenloomError
from tokenloom.gguf.loader import GGUFTensorNames

# (expert or None, first row, rows) of a parameter; None: the whole parameter
Shard = tuple[int | None, int, int] | None


class CheckpointNames:
    """Mixin of model classes (nn.Module with a .config): the naming declarations and what follows from them."""

    hf_prefix: str = "model."
    hf_unprefixed: tuple[str, ...] = ("lm_head",)
    hf_renamed_modules: dict[str, str] = {}
    packed_modules_mapping: dict[str, list[str]] = {}
    packed_experts_mapping: dict[str, list[str]] = {}
    gguf_tensor_names: GGUFTensorNames | None = None
    hf_config_defaults: dict = {}
    # checkpoint tensors that are no parameter of ours (buffers the model recomputes)
    ignored_checkpoint_tensors: tuple[str, ...] = ("rotary_emb.",)

    def packed_sizes(self, fused: str) -> list[int]:
        """Rows of each checkpoint module stacked into our fused module (or MoE parameter) `fused`."""
        raise NotImplementedError

    # ---- ours -> checkpoint ------------------------------------------------------------------------
    def checkpoint_module(self, module: str) -> str:
        """Checkpoint name of one of our (unfused) modules."""
        if module.split(".")[0] not in self.hf_unprefixed:
            module = self.hf_prefix + module
        padded = f".{module}."
        for ours, theirs in self.hf_renamed_modules.items():
            padded = padded.replace(f".{ours}.", f".{theirs}.")
        return padded[1:-1]

    def checkpoint_parts(self, module: str) -> list[tuple[str, int]]:
        """Our module -> [(checkpoint module, rows)] it stacks, in order; rows -1 for an unfused module. A MoE
        expert's slice is named `<moe>.experts.<j>.<w>` (for the parameter `<moe>.experts_<w>`)."""
        head, _, leaf = module.rpartition(".")
        if leaf in self.packed_modules_mapping:
            fused, parts = leaf, self.packed_modules_mapping[leaf]
        elif head.rpartition(".")[0].endswith("experts") and f"experts_{leaf}" in self.packed_experts_mapping:
            fused = f"experts_{leaf}"
            parts = self.packed_experts_mapping[fused]
        else:
            return [(self.checkpoint_module(module), -1)]
        return [(self.checkpoint_module(f"{head}.{p}"), n) for p, n in zip(parts, self.packed_sizes(fused))]

    def checkpoint_keys(self) -> dict[str, tuple[str, Shard]]:
        """Every checkpoint tensor the model needs -> (our parameter, the slice of it the tensor fills)."""
        keys: dict[str, tuple[str, Shard]] = {}
        for name, param in self.named_parameters():
            module, _, pname = name.rpartition(".")
            if pname in self.packed_experts_mapping:  # stacked experts: a parameter of the MoE module itself
                tag = pname.removeprefix("experts_")
                slices = [(j, f"{module}.experts.{j}.{tag}", "weight") for j in range(param.shape[0])]
            else:
                slices = [(None, module, pname)]
            for expert, mod, suffix in slices:
                parts = self.checkpoint_parts(mod)
                if len(parts) == 1 and expert is None:
                    keys[f"{parts[0][0]}.{suffix}"] = (name, None)
                    continue
                first = 0
                for ckpt, rows in parts:
                    keys[f"{ckpt}.{suffix}"] = (name, (expert, first, rows))
                    first += rows
        return keys

    # ---- loading -----------------------------------------------------------------------------------
    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]], deferred: frozenset[str] = frozenset()
                        ) -> None:
        """Load checkpoint-named tensors, each into the slice of the (fused) parameter it fills, as they arrive;
        every tensor the model needs must come, but those in `deferred` (a GGUF file's quantized blocks, which
        become quantized modules without ever being dequantized)."""
        keys = self.checkpoint_keys()
        params = dict(self.named_parameters())
        tied_head = self.checkpoint_module("lm_head") + ".weight" if self.config.tie_word_embeddings else None
        seen: set[str] = set()
        for name, tensor in weights:
            if name not in keys:
                if name == tied_head or any(s in name for s in self.ignored_checkpoint_tensors):
                    continue
                raise TokenloomError(f"checkpoint tensor '{name}' does not fit this architecture")
            target, shard = keys[name]
            dst = shard_view(params[target].data, shard)
            if dst.shape != tensor.shape:
                raise TokenloomError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            seen.add(name)
        missing = sorted(set(keys) - seen - deferred)
        if missing:
            raise TokenloomError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[0]}")


def shard_view(data: torch.Tensor, shard: Shard) -> torch.Tensor:
    if shard is None:
        return data
    expert, first, rows = shard
    if expert is not None:
        data = data[expert]
    return data.narrow(0, first, rows)

