"""Data parallelism: N independent engine replicas, each in a worker process of its own (engine.process_client),
behind one AsyncEngine-like front (`tokenloom serve MODEL --data-parallel-size N`).

A new request goes to the live replica with the fewest requests in flight (running + waiting, as this process
counts them: exact, not a stale snapshot); its stream is that replica's. Statistics are summed over the replicas
(ratios recomputed from the sums), step listeners hear every replica's steps. A replica that dies fails its own
requests with EngineDeadError; new requests go to the others, and only when none is left does adding fail.
"""
from __future__ import annotations

import dataclasses
import itertools

from tokenloom.config import EngineConfig, TokenloomError
from tokenloom.engine.async_engine import EngineDeadError, RequestStream
from tokenloom.engine.outputs import EngineStats
from tokenloom.engine.process_client import ProcessEngine
from tokenloom.sampling_params import SamplingParams

_RATIOS = {"kv_cache_usage", "prefix_cache_hit_rate", "kv_waste_paged", "kv_waste_contiguous"}


def merge_stats(stats: list[EngineStats]) -> EngineStats:
    """One EngineStats for several engines: counts summed, ratios weighted by what they are ratios of."""
    merged = {}
    for f in dataclasses.fields(EngineStats):
        values = [getattr(s, f.name) for s in stats]
        if f.name == "extra":
            merged[f.name] = _merge_extra(values)
        elif f.name in _RATIOS:
            merged[f.name] = 0.0
        else:
            merged[f.name] = sum(values)
    out = EngineStats(**merged)
    out.kv_cache_usage = out.num_blocks_used / out.num_blocks_total if out.num_blocks_total else 0.0
    queried = [(s.prompt_tokens_computed + s.prompt_tokens_reused, s) for s in stats]
    total = sum(q for q, _ in queried)
    out.prefix_cache_hit_rate = sum(q * s.prefix_cache_hit_rate for q, s in queried) / total if total else 0.0
    steps = sum(s.steps for s in stats)
    for name in ("kv_waste_paged", "kv_waste_contiguous"):
        setattr(out, name, sum(s.steps * getattr(s, name) for s in stats) / steps if steps else 0.0)
    return out


def _merge_extra(extras: list[dict]) -> dict:
    out: dict = {}
    for extra in extras:
        for key, value in extra.items():
            if isinstance(value, dict):
                inner = out.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = inner.get(k, 0) + v
            elif isinstance(value, (int, float)):
                out[key] = out.get(key, 0) + value
    return out


def start_workers(config: EngineConfig, specs: list[tuple[str, str]], threads: int) -> list[ProcessEngine]:
    """Worker processes for (role, name) specs, loading side by side; all stopped if one fails to start."""
    workers = []
    try:
        for role, name in specs:
            workers.append(ProcessEngine(config, threads, role=role, name=name, wait=False))
        for w in workers:
            w.wait_ready()
    except BaseException:
        for w in workers:
            w.shutdown(2)
        raise
    return workers


class EngineSet:
    """What a front over several worker engines shares: model facts, statistics, listeners, shutdown."""

    def __init__(self, workers: list[ProcessEngine]):
        if not workers:
            raise TokenloomError("no engine workers")
        self.workers = workers
        first = workers[0]
        self.engine = first.engine
        self.tokenizer = first.tokenizer
        self.model_name = first.model_name
        self.model_config = first.model_config
        self.max_model_len = min(w.max_model_len for w in workers)
        self.step_listeners: list = []
        for w in workers:
            w.step_listeners.append(self._on_step)
        self.last_step_num_seqs = 0
        self.max_step_num_seqs = 0
        self._ids = itertools.count()  # request ids unique over the workers (abort goes by id)

    def _on_step(self, n_seqs: int, seconds: float) -> None:
        self.last_step_num_seqs = n_seqs
        self.max_step_num_seqs = max(self.max_step_num_seqs, n_seqs)
        for fn in list(self.step_listeners):
            fn(n_seqs, seconds)

    def start(self):
        return self

    @property
    def is_running(self) -> bool:
        return any(w.is_running for w in self.workers)

    def live(self, workers: list[ProcessEngine] | None = None) -> list[ProcessEngine]:
        alive = [w for w in (workers or self.workers) if w.is_running]
        if not alive:
            raise EngineDeadError("every engine worker has stopped")
        return alive

    def least_loaded(self, workers: list[ProcessEngine] | None = None) -> ProcessEngine:
        return min(self.live(workers), key=lambda w: w.load)

    def shutdown(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            w.shutdown(timeout)

    def stats(self) -> EngineStats:
        return merge_stats([w.stats() for w in self.workers])

    def num_waiting(self) -> int:
        return sum(w.num_waiting() for w in self.workers)

    def has_unfinished(self) -> bool:
        return any(w.has_unfinished() for w in self.workers)

    def abort(self, request_id: str) -> None:
        for w in self.workers:
            w.abort(request_id)

    def abort_all(self, message: str) -> None:
        for w in self.workers:
            w.abort_all(message)

    async def compile_constraint(self, params: SamplingParams) -> None:
        """Compiled by the worker that takes the request."""

    async def run_on_engine(self, fn):
        return await self.workers[0].run_on_engine(fn)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        return await self.least_loaded().embed(prompts)

    def reset_prefix_cache(self) -> None:
        for w in self.live():
            w.reset_prefix_cache()


class DataParallelEngine(EngineSet):
    def __init__(self, config: EngineConfig, size: int, threads: int = 0):
        if size < 1:
            raise TokenloomError(f"--data-parallel-size must be at least 1, got {size}")
        super().__init__(start_workers(config, [("engine", f"dp{i}") for i in range(size)], threads))

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                          max_waiting: int | None = None, lora_request=None) -> RequestStream:
        """The request on the least loaded live replica (max_waiting: bounds that replica's queue)."""
        request_id = request_id or f"req-{next(self._ids)}"
        return await self.least_loaded().add_request(prompt, params, request_id, max_waiting, lora_request)
