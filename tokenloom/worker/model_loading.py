"""Load a model and its tokenizer from a resolved source: a HF safetensors directory (plain, or a GPTQ / AWQ /
tokenloom-quantized checkpoint) or a GGUF file."""
from __future__ import annotations

import gc

import torch

from tokenloom.config import TokenloomError
from tokenloom.distributed import RankInfo
from tokenloom.loader.safetensors import iter_safetensors, load_hf_config
from tokenloom.loader.sources import ModelSource
from tokenloom.model_executor.model_loader import build_model, config_from_hf, load_gguf
from tokenloom.quant.checkpoint import load_quantized


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int | None = None,
               keep_gguf_blocks: bool = False):
    """Returns (model, tokenizer). keep_gguf_blocks: a GGUF file's quantized linear and embedding weights are not
    read at all; the caller swaps in modules over the file's blocks (quantize_model(model, "gguf")) before the
    model runs, so no float copy of them is ever made."""
    raw_config: dict = {}
    deferred: frozenset[str] = frozenset()
    if source.kind == "hf_dir":
        raw_config = load_hf_config(source.path)
        cfg = config_from_hf(raw_config)  # the architecture's model class must exist
        # A directory without tokenizer files still runs on token ids (as vLLM's skip_tokenizer_init).
        has_tok = (source.path / "tokenizer.json").is_file()
        tokenizer = None
        if has_tok:
            from tokenloom.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_hf_dir(source.path)
        weights = iter_safetensors(source.path, dtype)
    else:
        cfg, state_dict, metadata = load_gguf(str(source.path), dtype, keep_blocks=keep_gguf_blocks)
        deferred = metadata.pop("tokenloom.deferred", frozenset())
        from tokenloom.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        weights = iter(state_dict.items())
    if tokenizer is not None:  # generation_config / tokenizer may declare more end-of-turn ids than config
        cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *tokenizer.eos_token_ids]))
    max_positions = max_positions or cfg.max_position_embeddings
    model = build_model(cfg, dtype, device, max_positions)
    if "quantization_config" in raw_config:  # GPTQ / AWQ / tokenloom-quantized directory
        load_quantized(model, source.path, raw_config["quantization_config"], dtype)
    else:
        model.load_hf_weights(weights, deferred)
    return model, tokenizer


def load_worker_model(source: ModelSource, dtype: torch.dtype, device: torch.device, quantization: str | None,
                      rank: RankInfo | None = None, group=None):
    """(model, tokenizer) with the weights in their run-time form; with `rank` (tensor / pipeline parallel), this
    rank's share of them, its layers joined to the other ranks' through `group`."""
    # GGUF blocks kept as they are: their modules come straight from the file, never via a float copy
    keep_blocks = quantization == "gguf" and source.kind == "gguf"
    model, tokenizer = load_model(source, dtype, device, keep_gguf_blocks=keep_blocks)
    if rank is None or rank.world_size == 1:
        if quantization:
            _quantize(model, quantization, tokenizer, source)
        return model, tokenizer
    plan = None
    if rank.tensor_parallel_size > 1:
        from tokenloom.model_executor.parallel import TensorParallelPlan, slice_float_weights

        if quantization in ("gptq", "awq") or source.kind == "hf_dir" and _is_prequantized(source):
            raise TokenloomError("tensor parallelism runs float, int8/int4/nf4 and GGUF-block weights; GPTQ/AWQ "
                                 "checkpoints are not sharded yet")
        plan = TensorParallelPlan(model.config, rank.tp_rank, rank.tensor_parallel_size)
        if quantization == "gguf":
            _quantize(model, quantization, tokenizer, source, tp_plan=plan)
        slice_float_weights(model, plan)
    if quantization and (plan is None or quantization != "gguf"):
        _quantize(model, quantization, tokenizer, source)
    if plan is not None:
        from tokenloom.model_executor.parallel import parallelize

        parallelize(model, plan, group)
    if rank.pipeline_parallel_size > 1:
        from tokenloom.model_executor.parallel import make_pipeline_stage

        make_pipeline_stage(model, rank.pp_rank, rank.pipeline_parallel_size, group)
    gc.collect()  # the other ranks' shares and stages go now
    return model, tokenizer


def _quantize(model, quantization: str, tokenizer, source: ModelSource, **kwargs) -> None:
    from tokenloom.quant import quantize_model

    quantize_model(model, quantization, tokenizer=tokenizer, gguf_path=source.path if source.kind == "gguf" else None,
                   **kwargs)


def _is_prequantized(source: ModelSource) -> bool:
    return "quantization_config" in load_hf_config(source.path)
