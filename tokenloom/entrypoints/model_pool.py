"""Many models, one server: which names it can load, loading on demand, keep-alive, and LRU unloading under a
count and memory budget (Ollama's scheduler, on tokenloom engines).

Each loaded model is a ServedModel with its own engine thread, weights and KV pool, keyed by its variant name
(`smollm2-135m`, `smollm2-135m:int8`; loader/variants.py). A request holds a lease on its model from resolution
until its response is sent (the server's ASGI gate releases it); a model with no lease and nothing in its engine
is idle. Idle models expire keep_alive seconds after their last request (0: at once; < 0: never), and the least
recently used idle ones are unloaded when loading another would pass --max-loaded-models or --memory-budget.
Loads run one at a time on a worker thread, so requests to loaded models never wait behind one.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from tokenloom.config import TokenloomError
from tokenloom.engine.async_engine import AsyncEngine
from tokenloom.entrypoints.server_state import APIError, ServedModel
from tokenloom.loader.sources import catalogue_key, list_models, resolve_model
from tokenloom.loader.variants import Variant

log = logging.getLogger("tokenloom.server")
_TAKE_S = 2.0  # a model just loaded waits this long for the requests that asked for it, whatever its keep-alive


@dataclass
class PoolConfig:
    keep_alive_s: float = 300.0  # Ollama's default: 5 minutes
    max_loaded_models: int = 3
    memory_budget_bytes: int = 0  # 0: no budget
    load_wait_s: float = 300.0  # how long a load waits for busy models to become idle (then 503)

    def __post_init__(self):
        if self.max_loaded_models < 1:
            raise TokenloomError("--max-loaded-models must be at least 1")
        if self.memory_budget_bytes < 0:
            raise TokenloomError("--memory-budget must not be negative")


@dataclass
class ModelSources:
    """The names this server can load: pulled catalogue models, names given with --model, and the models in
    --models-dir folders (each .gguf file by its stem, each Hugging Face folder by its name)."""

    models: list[str] = field(default_factory=list)
    models_dirs: list[Path] = field(default_factory=list)

    def known(self) -> dict[str, str]:
        """name -> what resolve_model takes."""
        out = {key: key for key, _, _ in list_models()}
        for given in self.models:
            key = catalogue_key(given)
            out[key or resolve_model(given, download=False).name] = key or given
        for folder in self.models_dirs:
            for path in sorted(Path(folder).expanduser().iterdir()) if Path(folder).expanduser().is_dir() else ():
                if path.suffix.lower() == ".gguf" and path.is_file():
                    out.setdefault(path.stem, str(path))
                elif (path / "config.json").is_file():
                    out.setdefault(path.name, str(path))
        return out

    def lookup(self, name: str) -> tuple[str, str] | None:
        """(the name as listed, its source) for a name given without a tag, matched without regard to case."""
        known = self.known()
        for listed, source in known.items():
            if listed.lower() == name.lower():
                return listed, source
        return None


def weight_bytes(model: torch.nn.Module) -> int:
    """Memory held by a model's tensors: parameters, buffers and the tensors its layers' methods keep (packed or
    quantized weights), each storage once."""
    storages: dict[int, int] = {}
    for module in model.modules():
        owners = [vars(module)] + [vars(m) for m in [getattr(module, "method", None)] if hasattr(m, "__dict__")]
        tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False),
                                  *(o.values() for o in owners))
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except NotImplementedError:  # oneDNN's packed (opaque) weights
                storages[id(t)] = t.numel() * t.element_size()
    return sum(storages.values())


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# (variant, source) -> a started AsyncEngine; runs on a worker thread
EngineFactory = Callable[[Variant, str], AsyncEngine]
# (variant, source) -> bytes of weights it will hold, before it is loaded
SizeEstimate = Callable[[Variant, str], int]


class ModelPool:
    def __init__(self, config: PoolConfig, factory: EngineFactory | None = None, estimate: SizeEstimate | None = None,
                 sources: ModelSources | None = None, metrics=None, max_queue: int | None = None):
        self.config = config
        self.factory, self.estimate = factory, estimate
        self.sources = sources or ModelSources()
        self.metrics, self.max_queue = metrics, max_queue
        self.loaded: dict[str, ServedModel] = {}
        self.pinned: set[str] = set()  # models given to the server at start (never unloaded)
        self.watched: set[str] = set()  # A/B route variants: they record the quality signal
        self._loading: dict[str, asyncio.Future] = {}
        self._load_lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task | None = None

    @property
    def on_demand(self) -> bool:
        return self.factory is not None

    def add_loaded(self, engine: AsyncEngine, name: str, pinned: bool = True, load_duration_s: float = 0.0
                   ) -> ServedModel:
        """Serve an engine loaded by the caller (`tokenloom serve MODEL`)."""
        model = ServedModel(engine, name, self.max_queue, self.metrics, keep_alive_s=-1.0 if pinned else
                            self.config.keep_alive_s, load_duration_s=load_duration_s,
                            quality_signal=name in self.watched)
        model.weight_bytes = weight_bytes(engine.engine.model)
        self.loaded[name] = model
        if pinned:
            self.pinned.add(name)
        if self.metrics is not None:
            self.metrics.attach(name, engine)
        return model

    def watch(self, names: set[str]) -> None:
        """Record the quality signal for these models (the variants of the A/B routes)."""
        self.watched = set(names)
        for name, model in self.loaded.items():
            model.quality_signal = name in self.watched

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the keep-alive reaper (inside the server's event loop)."""
        if self._reaper is None and self.on_demand:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for name in [n for n in self.loaded if n not in self.pinned]:
            await self.unload(name)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for name, model in list(self.loaded.items()):
                if name not in self.pinned and model.expires_at is not None and model.expires_at <= now \
                        and model.idle:
                    await self.unload(name)

    # ---- getting a model ---------------------------------------------------------------------------------------
    async def get(self, variant: Variant, source: str, keep_alive_s: float | None = None) -> ServedModel:
        """The loaded model of a variant, loading it first if needed; leased to the caller (release() it). The load
        is a task of its own: a client that goes away mid-load leaves it to finish (the model then expires as if
        used), and every request waiting for it gets the load's error."""
        while True:
            model = self.loaded.get(variant.name)
            if model is not None:
                if keep_alive_s is not None and variant.name not in self.pinned:
                    model.keep_alive_s = keep_alive_s
                model.acquire()
                return model
            task = self._loading.get(variant.name)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(variant, source, keep_alive_s))
                self._loading[variant.name] = task
                task.add_done_callback(partial(self._loaded, variant.name))
            await asyncio.shield(task)

    def _loaded(self, name: str, task: asyncio.Task) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters re-raise it

    async def _load(self, variant: Variant, source: str, keep_alive_s: float | None) -> None:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            budget = self.config.memory_budget_bytes
            estimate = await asyncio.to_thread(self.estimate, variant, source) if self.estimate else 0
            if budget and estimate > budget:
                raise _too_large(variant.name, estimate, budget)
            await self._make_room(estimate)
            t0 = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self.factory, variant, source)
            except TokenloomError as exc:
                raise APIError(400, f"model '{variant.name}' could not be loaded: {exc}", param="model") from None
            except Exception as exc:  # noqa: BLE001 - a broken file: the server's side, said plainly
                log.exception("loading '%s' failed", variant.name)
                raise APIError(500, f"model '{variant.name}' could not be loaded: {exc}", type="server_error",
                               param="model") from None
            model = self.add_loaded(engine, variant.name, pinned=False, load_duration_s=time.perf_counter() - t0)
            model.keep_alive_s = self.config.keep_alive_s if keep_alive_s is None else keep_alive_s
            if model.keep_alive_s >= 0:  # unleased until a request takes it (a moment later): then it expires
                model.expires_at = time.time() + model.keep_alive_s + _TAKE_S
            model.weight_bytes = model.weight_bytes or estimate
            if budget and model.weight_bytes > budget:
                await self.unload(variant.name)
                raise _too_large(variant.name, model.weight_bytes, budget)
            log.info("loaded '%s' in %.2f s", variant.name, model.load_duration_s)

    def used_bytes(self) -> int:
        return sum(m.size_bytes() for m in self.loaded.values())

    async def _make_room(self, needed: int) -> None:
        """Unload idle models, least recently used first, until one more model of `needed` bytes fits; wait (up
        to load_wait_s) while the models in the way are busy."""
        deadline = time.monotonic() + self.config.load_wait_s
        budget = self.config.memory_budget_bytes
        while True:
            over_count = len(self.loaded) + 1 > self.config.max_loaded_models
            over_memory = bool(budget) and self.used_bytes() + needed > budget
            if not (over_count or over_memory):
                return
            idle = sorted((m for n, m in self.loaded.items() if n not in self.pinned and m.idle),
                          key=lambda m: m.last_used)
            if idle:
                await self.unload(idle[0].name)
                continue
            if not any(n not in self.pinned for n in self.loaded) or time.monotonic() > deadline:
                why = "--max-loaded-models" if over_count else "--memory-budget"
                raise APIError(503, f"cannot load another model: the loaded models fill {why} and are busy",
                               type="server_error", code="models_busy")
            await asyncio.sleep(0.05)

    async def unload(self, name: str) -> bool:
        """Stop a model's engine and free its memory (weights and KV pool go back to the OS)."""
        model = self.loaded.pop(name, None)
        if model is None:
            return False
        self.pinned.discard(name)
        if self.metrics is not None:
            self.metrics.detach(name)
        engine = model.engine
        del model
        await asyncio.to_thread(engine.shutdown)
        del engine
        await asyncio.to_thread(lambda: (gc.collect(), _trim_heap()))
        log.info("unloaded '%s'", name)
        return True


def _too_large(name: str, size: int, budget: int) -> APIError:
    return APIError(507, f"model '{name}' needs about {size / 2**20:.0f} MiB, more than the memory budget of "
                         f"{budget / 2**20:.0f} MiB (--memory-budget)", type="server_error",
                    code="insufficient_storage", param="model")
