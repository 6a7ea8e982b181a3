"""Builds the speculative decoder a SpeculativeConfig asks for: the proposer (and its draft model on a ModelRunner
of its own), wrapped in the Speculator the model runner calls after each step (spec_decode/)."""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from tokenloom.config import CacheConfig, SpeculativeConfig, TokenloomError
from tokenloom.spec_decode.draft_model import DraftModelProposer
from tokenloom.spec_decode.ngram import NgramProposer
from tokenloom.spec_decode.speculator import Speculator
from tokenloom.worker.kv_cache import kv_bytes_per_block
from tokenloom.worker.model_loading import load_worker_model
from tokenloom.worker.model_runner import ModelRunner


def first_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """The model's first num_layers decoder layers, final norm and head, as a model sharing every weight (and
    each layer's KV cache binding) with it."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["layers"] = nn.ModuleList(list(model.layers)[:num_layers])
    view.config = dataclasses.replace(model.config, num_layers=num_layers)
    return view


@dataclasses.dataclass
class DraftModel:
    model: nn.Module
    shares_target_cache: bool  # layer_skip: the target's own layers and their cache

    @classmethod
    def load(cls, spec: SpeculativeConfig, target: nn.Module, tokenizer, source, dtype: torch.dtype,
             device: torch.device) -> "DraftModel | None":
        """The draft model of a model-based method (None for n-gram)."""
        if spec.method == "ngram":
            return None
        if spec.method == "layer_skip":
            total = target.config.num_layers
            n = spec.draft_layers or max(1, total // 4)
            if n >= total:
                raise TokenloomError(f"draft_layers must be below the model's {total} layers, got {n}")
            return cls(first_layers(target, n), True)
        if spec.method == "self":
            model, _ = load_worker_model(source, dtype, device, spec.draft_quantization or "int4")
            return cls(model, False)
        from tokenloom.loader.sources import resolve_model

        draft_source = resolve_model(spec.model)
        quantization = spec.draft_quantization
        if quantization is None and draft_source.kind == "gguf" and device.type == "cpu":
            quantization = "gguf"  # as the target: a GGUF file runs on its own blocks
        model, draft_tokenizer = load_worker_model(draft_source, dtype, device,
                                                   None if quantization == "none" else quantization)
        check_vocabulary(target, tokenizer, model, draft_tokenizer)
        return cls(model, False)

    def kv_bytes_per_block(self, cache: CacheConfig) -> int:
        """The draft's K/V bytes per block of the target's cache (none when it shares the target's)."""
        if self.shares_target_cache:
            return 0
        return kv_bytes_per_block(self.model.config, cache.block_size, self.model.norm.weight.dtype,
                                  cache.kv_cache_dtype)


def check_vocabulary(target, tokenizer, draft, draft_tokenizer) -> None:
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise TokenloomError(f"the draft model's vocabulary ({dv} tokens) is not the target's ({tv} tokens)")
    if tokenizer is not None and draft_tokenizer is not None:
        probe = "Speculative decoding: the draft proposes, the target verifies. 12345 ünïcödé"
        if tokenizer.encode(probe) != draft_tokenizer.encode(probe):
            raise TokenloomError("the draft model's tokenizer differs from the target's")


def build_speculator(spec: SpeculativeConfig, draft: DraftModel | None, target_runner, max_model_len: int,
                     cache: CacheConfig, generator: torch.Generator) -> Speculator:
    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        proposer = NgramProposer(k, spec.prompt_lookup_max, spec.prompt_lookup_min)
    else:
        caches = target_runner.layer_caches[: draft.model.config.num_layers] if draft.shares_target_cache else None
        draft_generator = torch.Generator().manual_seed(generator.initial_seed() + 1)  # the engine's stream untouched
        runner = ModelRunner(draft.model, cache, target_runner.num_blocks, target_runner.device, draft_generator,
                             layer_caches=caches)
        proposer = DraftModelProposer(k, runner, draft.shares_target_cache)
    return Speculator(proposer, max_model_len, target_runner.block_size, spec.adaptive,
                      target_runner.config.eos_token_ids)
