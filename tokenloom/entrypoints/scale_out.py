"""Engines in worker processes behind one server: data-parallel replicas (--data-parallel-size N) and
prefill/decode disaggregation (--prefill-workers N --decode-workers M), built from the command's engine
arguments (engine.data_parallel, engine.disagg)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tokenloom.config import (CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, SpeculativeConfig,
                              TokenloomError)
from tokenloom.entrypoints.engine_args import EngineArgs
from tokenloom.loader.variants import TAGS, split_tag


def engine_config(args: EngineArgs) -> EngineConfig:
    """The EngineConfig that LLM(**args) would build (a NAME:TAG variant resolved the same way)."""
    kw = dataclasses.asdict(args)
    base, tag = split_tag(args.model)
    if tag is not None and not Path(args.model).expanduser().exists():
        kw.update(model=base, **TAGS[tag])
    extra = {}
    if "tensor_parallel_size" in kw:  # tensor/pipeline parallel replicas, where the engine knows them
        from tokenloom.config import ParallelConfig

        extra["parallel"] = ParallelConfig(kw["tensor_parallel_size"], kw["pipeline_parallel_size"],
                                           kw["distributed_executor_backend"])
    return EngineConfig(
        model=kw["model"], dtype=kw["dtype"], device=kw["device"], seed=kw["seed"], quantization=kw["quantization"],
        cache=CacheConfig(kw["block_size"], kw["kv_cache_memory"], kw.get("num_blocks"), kw["enable_prefix_caching"],
                          kw["kv_cache_dtype"], kw["kv_release_interval_s"], kw["kv_keep_cached_bytes"]),
        scheduler=SchedulerConfig(kw["max_num_seqs"], kw["max_num_batched_tokens"], kw["max_model_len"]),
        speculative=SpeculativeConfig.parse(kw["speculative_config"]),
        lora=LoRAConfig(kw["max_loras"], kw["max_lora_rank"], kw["max_cpu_loras"]) if kw["enable_lora"] else None,
        enforce_eager=kw.get("enforce_eager", False), batch_invariant=kw.get("batch_invariant", False), **extra,
    )


def wants_workers(ns) -> bool:
    return (getattr(ns, "data_parallel_size", 1) or 1) > 1 or bool(getattr(ns, "prefill_workers", 0)) or bool(
        getattr(ns, "decode_workers", 0))


def make_worker_engine(ns):
    """The engine front the namespace asks for: DisaggEngine or DataParallelEngine (both AsyncEngine-like)."""
    args = EngineArgs.from_namespace(ns)
    if args.enable_lora:
        raise TokenloomError("LoRA adapters need the engine in the server process: drop --enable-lora, or serve "
                             "without --data-parallel-size / --prefill-workers")
    config = engine_config(args)
    dp = getattr(ns, "data_parallel_size", 1) or 1
    prefill, decode = getattr(ns, "prefill_workers", 0) or 0, getattr(ns, "decode_workers", 0) or 0
    if prefill or decode:
        if dp > 1:
            raise TokenloomError("--data-parallel-size and --prefill-workers/--decode-workers do not combine: "
                                 "use --decode-workers M for M decode replicas")
        if prefill < 1 or decode < 1:
            raise TokenloomError("disaggregation needs both --prefill-workers N and --decode-workers M (>= 1)")
        from tokenloom.engine.disagg import DisaggEngine

        return DisaggEngine(config, prefill, decode, threads=args.threads or _threads_each(prefill + decode))
    from tokenloom.engine.data_parallel import DataParallelEngine

    return DataParallelEngine(config, dp, threads=args.threads or _threads_each(dp))


def _threads_each(workers: int) -> int:
    """The cores shared out between the worker processes (at least one thread each)."""
    return max(1, (os.cpu_count() or 1) // workers)
