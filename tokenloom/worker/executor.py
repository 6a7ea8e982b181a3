"""Executors: what runs the model for the engine. The engine talks to one through this small interface, so one
process today and several (tensor / pipeline parallel workers) later are interchangeable.

UniProcExecutor loads the model in this process: weights (and quantization), the CPU fast paths, the KV cache
sized for the device's free memory, the model runner (on CUDA with its decode graphs, worker/cuda_graphs.py), and
(LoRA) the adapters' manager and slots.
"""
from __future__ import annotations

import abc
import logging

import torch

from tokenloom.config import EngineConfig, ModelConfig, TokenloomError
from tokenloom.loader.sources import ModelSource
from tokenloom.worker.kv_cache import available_memory, kv_bytes_per_block, trim_heap
from tokenloom.worker.model_loading import load_worker_model
from tokenloom.worker.model_runner import ModelRunner
from tokenloom.worker.outputs import ModelRunnerOutput

log = logging.getLogger("tokenloom")

KV_CACHE_MEMORY_SHARE = 0.25  # of the device's free memory, when no budget is given


def model_bytes(model) -> int:
    """Bytes of the weights a model holds (parameters and buffers, a tied matrix once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class WorkerDiedError(TokenloomError):
    """A rank of a parallel model died: the model cannot run any more (the engine fails its requests and stops)."""

    fatal = True


class Executor(abc.ABC):
    """Runs steps of the model; owns the weights and the KV cache tensors."""

    model_config: ModelConfig
    tokenizer: object
    num_blocks: int
    max_model_len: int
    kv_block_bytes: int  # one block's K/V over every layer
    kv_blocks_per_page: int = 1  # how far a page of the KV pool reaches across blocks (KVCache.blocks_per_page)
    lora_manager = None  # lora.LoRAManager of the model's adapters, when LoRA is enabled

    @abc.abstractmethod
    def execute_model(self, scheduler_output) -> ModelRunnerOutput:
        """Run one scheduled step (core.scheduler_output.SchedulerOutput)."""

    @abc.abstractmethod
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        """Final-norm hidden states of one sequence, outside the KV cache (embeddings)."""

    def release_memory(self, blocks: list[int], idle: bool = False) -> int:
        """Return the memory of these free KV blocks to the OS (idle: and the C heap's free pages, where past
        steps' activations lived); the KV bytes released."""
        return 0

    def rank_memory(self) -> list[tuple[int, int]]:
        """(weight bytes, KV cache bytes) held by each rank, in rank order (one rank here)."""
        return [(model_bytes(self.model), self.runner.cache.nbytes)]

    def shutdown(self) -> None:
        """Release workers (nothing to do in one process)."""


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource, dtype: torch.dtype, generator: torch.Generator):
        device = torch.device(config.device)
        self.model, self.tokenizer = load_worker_model(source, dtype, device, config.quantization)
        self.model_config = cfg = self.model.config
        if device.type == "cpu":
            from tokenloom.kernels import cpu_ops

            cpu_ops.EXTENSION.load()  # build or load the fused kernels now, not inside the first request's TTFT
        draft = None
        if config.speculative is not None:
            from tokenloom.worker.speculative import DraftModel

            draft = DraftModel.load(config.speculative, self.model, self.tokenizer, source, dtype, device)
        extra = draft.kv_bytes_per_block(config.cache) if draft else 0
        cache_cfg = config.cache
        self.kv_block_bytes = kv_bytes_per_block(cfg, cache_cfg.block_size, dtype, cache_cfg.kv_cache_dtype) + extra
        self.num_blocks, self.max_model_len = self._size_kv_cache(config, cfg, device, self.kv_block_bytes)
        graphs = device.type == "cuda" and self._graphs_wanted(config, cfg, device)
        # with CUDA graphs, one block more than the scheduler knows of: the pad rows' scratch block
        self.runner = ModelRunner(self.model, config.cache, self.num_blocks + (1 if graphs else 0), device, generator,
                                  batch_invariant=config.batch_invariant)
        if graphs:
            from tokenloom.worker.cuda_graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.model, config.cache.block_size, self.num_blocks,
                                              self.max_model_len, config.scheduler.max_num_seqs, device)
        self.num_lookahead_tokens = 0  # slots the scheduler keeps beyond each request for a draft model's K/V
        if config.speculative is not None:
            from tokenloom.worker.speculative import build_speculator

            self.runner.speculator = build_speculator(config.speculative, draft, self.runner, self.max_model_len,
                                                      config.cache, generator)
            if self.runner.speculator.proposer.needs_lookahead_slots:
                self.num_lookahead_tokens = config.speculative.num_speculative_tokens
        # the KV pools indexed by the scheduler's block ids: the target's, and a draft model's own at the same slots
        runners = [self.runner, getattr(self.runner.speculator and self.runner.speculator.proposer, "runner", None)]
        self.runners = [r for r in runners if r is not None]
        self.kv_caches = [r.cache for r in self.runners if r.cache is not None]
        self.kv_blocks_per_page = max((c.blocks_per_page for c in self.kv_caches), default=1)
        self._heap_trimmed = False
        self.lora_manager = None
        if config.lora is not None:
            from tokenloom.lora import LoRAManager

            # after the runners: the compiled decode stacks read the base layers, which LoRA then wraps
            self.runner.lora = self.lora_manager = LoRAManager(self.model, config.lora)
        if device.type == "cpu":
            from tokenloom.model_executor.layers.linear import pack_linear_layers

            # after the runners: their compiled decode stacks keep the plain float matrices they were built on,
            # the layers (wider batches, prefill) use oneDNN's packed copies
            for model in {id(m): m for m in (self.model, draft and draft.model) if m is not None}.values():
                pack_linear_layers(model)

    @staticmethod
    def _graphs_wanted(config: EngineConfig, cfg: ModelConfig, device: torch.device) -> bool:
        """Decode steps replayed from CUDA graphs (worker/cuda_graphs.py; CUDA only: never imported elsewhere)."""
        from tokenloom.worker.cuda_graphs import off_reason

        reason = off_reason(config, cfg, device)
        if reason is not None:
            log.info("CUDA graphs off (%s): every step runs eagerly", reason)
        return reason is None

    @staticmethod
    def _size_kv_cache(config: EngineConfig, cfg: ModelConfig, device, block_bytes: int) -> tuple[int, int]:
        """(blocks, max_model_len); block_bytes: a block's K/V in every layer (and a draft model's)."""
        cache_cfg, sched_cfg = config.cache, config.scheduler
        max_model_len = min(sched_cfg.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if cache_cfg.num_blocks:
            num_blocks = cache_cfg.num_blocks
        else:
            budget = cache_cfg.kv_cache_memory or min(
                int(available_memory(device) * KV_CACHE_MEMORY_SHARE),
                # no point reserving more than every sequence at full length needs
                sched_cfg.max_num_seqs * max_model_len * block_bytes // cache_cfg.block_size,
            )
            num_blocks = max(1, budget // block_bytes)
        if num_blocks * cache_cfg.block_size < max_model_len:
            if sched_cfg.max_model_len:
                raise TokenloomError(
                    f"KV cache holds {num_blocks * cache_cfg.block_size} tokens, less than max_model_len "
                    f"{max_model_len}: raise --kv-cache-memory or lower --max-model-len"
                )
            max_model_len = num_blocks * cache_cfg.block_size
        return num_blocks, max_model_len

    def execute_model(self, scheduler_output) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def release_memory(self, blocks: list[int], idle: bool = False) -> int:
        released = sum(cache.release_blocks(blocks) for cache in self.kv_caches) if blocks else 0
        self._trim_when_idle(idle, released)
        return released

    def _trim_when_idle(self, idle: bool, released: int) -> None:
        """Once per idle spell (and again when blocks were freed since): drop the samplers' [rows, vocabulary]
        buffers, sized by the widest step seen, and return the C heap's free pages."""
        if idle and (released or not self._heap_trimmed):
            for runner in self.runners:
                runner.sampler.ws.clear()
            trim_heap()
        self._heap_trimmed = idle

    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.hidden_states(token_ids)
