"""Executors over several ranks (tensor / pipeline parallel): the engine's process is rank 0 and leads, the other
ranks run as local worker processes ("mp", torch.multiprocessing spawn) or as Ray actors placed by a placement
group over a Ray cluster's nodes ("ray"). All ranks form one torch.distributed group (gloo on the CPU, NCCL on
CUDA). See worker/parallel_worker.py for what each side does in a step.

A rank that dies makes rank 0's next collective fail at once (the peer's socket closes): the step raises
WorkerDiedError, every other rank is stopped, and the engine fails its requests and refuses new ones.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from tokenloom.config import EngineConfig, TokenloomError
from tokenloom.distributed import ParallelGroup, RankInfo, free_port
from tokenloom.loader.sources import ModelSource
from tokenloom.worker.executor import UniProcExecutor, WorkerDiedError
from tokenloom.worker.kv_cache import kv_bytes_per_block
from tokenloom.worker.model_loading import load_worker_model
from tokenloom.worker.model_runner import ModelRunner
from tokenloom.worker.outputs import ModelRunnerOutput
from tokenloom.worker import parallel_worker as pw

log = logging.getLogger("tokenloom")


class ParallelExecutor(UniProcExecutor):
    def __init__(self, config: EngineConfig, source: ModelSource, dtype: torch.dtype, generator: torch.Generator):
        pc = config.parallel
        if config.speculative is not None and config.speculative.method != "ngram":
            raise TokenloomError("with tensor/pipeline parallelism, speculative decoding runs n-gram drafts only")
        if config.lora is not None:
            raise TokenloomError("LoRA adapters with tensor/pipeline parallelism are not supported yet")
        device = torch.device(config.device)
        self.rank = RankInfo(0, pc.tensor_parallel_size, pc.pipeline_parallel_size)
        if device.type == "cpu":
            torch.set_num_threads(pw._threads_per_rank(self.rank.world_size))
        self.backend = _backend(pc.distributed_executor_backend)
        host = self.backend.master_addr(pc.master_addr)
        port = pc.master_port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.backend.start(config, source, dtype, self.rank, host, port)
        self._stopped = False
        try:
            self.group = self._join(lambda: ParallelGroup(self.rank, host, port, device, pc.worker_start_timeout_s),
                                    pc.worker_start_timeout_s)
            self._load(config, source, dtype, generator, device)
        except BaseException:
            self.shutdown()
            raise

    def _load(self, config, source, dtype, generator, device) -> None:
        self.model, self.tokenizer = load_worker_model(source, dtype, device, config.quantization, self.rank,
                                                       self.group)
        local = self.model.config
        self.model_config = getattr(self.model, "global_config", local)  # the engine sees the whole model
        cache_cfg = config.cache
        # the rank holding the most heads sets the block budget; every rank allocates the same number of blocks
        # a pipeline stage caches its own layers only (rank 0's stage is the largest)
        stage = getattr(self.model, "pipeline_layers", range(local.num_layers))
        here = dataclasses.replace(local, num_layers=len(stage))
        self.kv_block_bytes = kv_bytes_per_block(here, cache_cfg.block_size, dtype, cache_cfg.kv_cache_dtype)
        self.num_blocks, self.max_model_len = self._size_kv_cache(config, self.model_config, device,
                                                                  self.kv_block_bytes)
        self.group.broadcast_object((pw.INIT, self.num_blocks))
        self.runner = ModelRunner(self.model, cache_cfg, self.num_blocks, device, generator, compiled_decode=False)
        self.runner.model = pw.LeaderModel(self.model, self.group, self.rank.tensor_parallel_size > 1)
        self.runner.microbatches = config.parallel.pipeline_microbatches if self.rank.pipeline_parallel_size > 1 else 1
        # rank 0 holds the most heads of a split; another rank's planes are at least half as wide
        self.kv_blocks_per_page = self.runner.cache.blocks_per_page * (2 if self.rank.tensor_parallel_size > 1 else 1)
        self.num_lookahead_tokens = 0
        if config.speculative is not None:
            from tokenloom.worker.speculative import build_speculator

            self.runner.speculator = build_speculator(config.speculative, None, self.runner, self.max_model_len,
                                                      cache_cfg, generator)
        self.runners, self.kv_caches = [self.runner], [self.runner.cache]
        self._heap_trimmed = False
        if device.type == "cpu":
            from tokenloom.model_executor.layers.linear import pack_linear_layers

            pack_linear_layers(self.model)
        self._guarded(self.group.barrier)  # every rank loaded and ready

    def _join(self, make, timeout_s: float):
        """Form the group while watching the workers start: one that dies first fails the start at once."""
        box: dict = {}

        def run():
            try:
                box["group"] = make()
            except BaseException as exc:  # noqa: BLE001 - reported below
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True, name="tokenloom-rendezvous")
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive():
            thread.join(0.1)
            if (dead := self.backend.dead()) is not None:
                raise WorkerDiedError(f"worker rank {dead} exited while starting ({self.backend.exit_reason(dead)})")
            if time.monotonic() > deadline:
                raise WorkerDiedError(f"the workers did not start within {timeout_s:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["group"]

    def _guarded(self, fn, *args):
        """fn(*args), turning a collective that fails because a rank died into WorkerDiedError (and stopping the
        other ranks)."""
        if self._stopped:
            raise WorkerDiedError("the model's worker processes have stopped")
        try:
            return fn(*args)
        except RuntimeError as exc:
            time.sleep(0.05)  # let the dead worker's exit be seen
            dead = self.backend.dead()
            reason = f"worker rank {dead} died ({self.backend.exit_reason(dead)})" if dead is not None else \
                f"a worker stopped answering ({exc})"
            self.shutdown()
            raise WorkerDiedError(f"{reason}: the model is unavailable until the server restarts") from exc

    def execute_model(self, scheduler_output) -> ModelRunnerOutput:
        if scheduler_output.blocks_to_copy:
            self._guarded(self.group.broadcast_object, (pw.COPY_BLOCKS, scheduler_output.blocks_to_copy))
        return self._guarded(self.runner.execute, scheduler_output)

    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        self._guarded(self.group.broadcast_object, (pw.HIDDEN, token_ids))
        hidden = self._guarded(pw.hidden_states, self.model, token_ids)
        self.group.wait_sends()
        return hidden

    def rank_memory(self) -> list[tuple[int, int]]:
        """(weight bytes, KV cache bytes) held by each rank, in rank order."""
        self._guarded(self.group.broadcast_object, (pw.MEMORY,))
        return self._guarded(pw.memory_of, self.runner, self.group)

    def release_memory(self, blocks: list[int], idle: bool = False) -> int:
        released = 0
        if blocks and not self._stopped:
            self._guarded(self.group.broadcast_object, (pw.RELEASE, blocks))
            released = self.runner.cache.release_blocks(blocks)
        self._trim_when_idle(idle, released)
        return released

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        group = getattr(self, "group", None)
        if group is not None and self.backend.dead() is None:
            try:
                group.broadcast_object((pw.STOP,))
            except RuntimeError:
                pass
        self.backend.stop()


def _backend(name: str):
    if name == "ray":
        from tokenloom.worker.ray_workers import RayWorkers

        return RayWorkers()
    from tokenloom.worker.process_workers import ProcessWorkers

    return ProcessWorkers()
