"""The LoRA manager: the adapters an engine knows by name, their weights in host memory (LRU) and the max_loras
slots the LoRA layers compute with.

    manager.add(LoRARequest("sql", 1, "/adapters/sql"))   # read and checked now: LoRAError if it does not fit
    manager.list()                                         # [LoRAInfo(name="sql", id=1, ...)]
    manager.remove("sql")                                  # by name or id; LoRAError while requests use it

A step's adapters take slots (activate), the least recently used slot first; loading a slot copies the adapter's
stacked factors into every LoRA layer. Host memory keeps the weights of max_cpu_loras adapters, least recently
used first out, but never those of an adapter in a slot or one that a queued or running request still needs (the
engine says which through `in_use`): so a request never finds its adapter gone. An adapter whose weights were
dropped is read again from its path when next asked for.

Not thread-safe: call it on the engine's thread (AsyncEngine.run_on_engine); `read` alone (files in, new tensors
out) may run anywhere, e.g. to check an adapter off the engine thread before `add(request, adapter)`.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from tokenloom.config import LoRAConfig
from tokenloom.kernels import lora_ops
from tokenloom.lora.adapter import LoRAAdapter, LoRAError, read_adapter
from tokenloom.lora.layers import lora_targets, wrap_model
from tokenloom.lora.request import LoRARequest
from tokenloom.model_executor.forward_context import LoRAMapping


@dataclass
class LoRAInfo:
    """What the engine knows of one adapter (list / add answer with these)."""
    name: str
    id: int
    path: str
    format: str  # "peft" or "gguf"
    rank: int
    target_modules: list[str]
    loaded: bool  # its weights are in host memory
    slot: int | None  # the slot it computes in, if any


class LoRAManager:
    def __init__(self, model, config: LoRAConfig):
        self.model, self.config = model, config
        self.device = model.norm.weight.device
        self.targets = lora_targets(model)
        self.layers = wrap_model(model, self.targets, config.max_loras, config.max_lora_rank)
        self._requests: dict[str, LoRARequest] = {}  # by name
        self._names: dict[int, str] = {}  # id -> name
        self._summary: dict[int, tuple[str, int, list[str]]] = {}  # id -> (format, rank, target modules)
        self._generation: dict[int, int] = {}  # id -> when it was added: its prefix-cache hash seed
        self._added = itertools.count(1)
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # front: least recently used
        self._slots: list[int | None] = [None] * config.max_loras  # the adapter id in each slot
        self._slot_lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(config.max_loras))
        self.in_use: Callable[[], set[int]] = set  # ids of queued or running requests' adapters (the engine's)
        self.stats = {"slot_loads": 0, "disk_reads": 0, "host_evictions": 0}
        if self.device.type == "cpu":
            lora_ops.EXTENSION.load()  # built (once) or loaded now, not inside the first adapter request's step

    # ---- the registry ----------------------------------------------------------------------------------
    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check the adapter at request.lora_path against this model (LoRAError if it does not fit);
        changes nothing here."""
        return read_adapter(request, self.model, self.targets, self.config.max_lora_rank)

    def add(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAInfo:
        """Register an adapter under its name and id, its weights read (or `adapter`, read by `read`) and kept
        in host memory. Adding the same (name, id, path) again changes nothing; a name or id taken by another
        adapter is a LoRAError."""
        known = self._requests.get(request.lora_name)
        if known is not None and known != request:
            raise LoRAError(f"LoRA adapter name '{request.lora_name}' is taken (id {known.lora_int_id}, "
                            f"path {known.lora_path}): remove it first")
        other = self._names.get(request.lora_int_id)
        if other is not None and other != request.lora_name:
            raise LoRAError(f"LoRA id {request.lora_int_id} is taken by adapter '{other}'")
        if known is None:
            if adapter is None or adapter.request != request:
                adapter = self.read(request)
            self._requests[request.lora_name] = request
            self._names[request.lora_int_id] = request.lora_name
            self._summary[request.lora_int_id] = (adapter.format, adapter.rank, adapter.target_modules)
            self._generation[request.lora_int_id] = next(self._added)
            self._keep(adapter)
        return self.info(request.lora_name)

    def remove(self, name_or_id: str | int) -> bool:
        """Forget an adapter (by name or id); False if there is none such. LoRAError while requests use it."""
        request = self.get(name_or_id)
        if request is None:
            return False
        lora_id = request.lora_int_id
        if lora_id in self.in_use():
            raise LoRAError(f"LoRA adapter '{request.lora_name}' is in use by queued or running requests")
        del self._requests[request.lora_name], self._names[lora_id], self._summary[lora_id]
        del self._generation[lora_id]
        self._host.pop(lora_id, None)
        if lora_id in self._slots:
            slot = self._slots.index(lora_id)
            self._slots[slot] = None
            for layer in self.layers.values():
                layer.set_slot(slot, None)
            self._slot_lru.move_to_end(slot, last=False)  # a free slot is taken first
        return True

    def get(self, name_or_id: str | int) -> LoRARequest | None:
        if isinstance(name_or_id, int):
            name_or_id = self._names.get(name_or_id, "")
        return self._requests.get(name_or_id)

    def info(self, name: str) -> LoRAInfo:
        request = self._requests[name]
        lora_id = request.lora_int_id
        fmt, rank, modules = self._summary[lora_id]
        slot = self._slots.index(lora_id) if lora_id in self._slots else None
        return LoRAInfo(name, lora_id, request.lora_path, fmt, rank, list(modules), lora_id in self._host, slot)

    def list(self) -> list[LoRAInfo]:
        """Every registered adapter, in the order they were added."""
        return [self.info(name) for name in self._requests]

    def prepare(self, request: LoRARequest) -> tuple:
        """Before a request runs with this adapter: add it if it is new (vLLM loads adapters on first use), read
        its weights back if they were dropped; returns its prefix-cache hash seed, which differs between
        adapters, and between an adapter and one added later under the same id."""
        self.add(request)
        self._host_weights(request.lora_int_id)
        return ("lora", request.lora_int_id, self._generation[request.lora_int_id])

    # ---- host memory -----------------------------------------------------------------------------------
    def _host_weights(self, lora_id: int) -> LoRAAdapter:
        adapter = self._host.get(lora_id)
        if adapter is None:
            adapter = self.read(self._requests[self._names[lora_id]])
            self.stats["disk_reads"] += 1
            self._keep(adapter)
        else:
            self._host.move_to_end(lora_id)
        return adapter

    def _keep(self, adapter: LoRAAdapter) -> None:
        lora_id = adapter.request.lora_int_id
        self._host[lora_id] = adapter
        self._host.move_to_end(lora_id)
        self._trim(keep=lora_id)

    def _trim(self, keep: int = 0) -> None:
        """Drop the least recently used weights beyond max_cpu_loras, but those in use, in a slot or `keep`
        (memory may run over while requests need more adapters than that)."""
        excess = len(self._host) - self.config.max_cpu_loras
        if excess <= 0:
            return
        busy = self.in_use() | set(self._slots) | {keep}
        for victim in [i for i in self._host if i not in busy][:excess]:
            del self._host[victim]
            self.stats["host_evictions"] += 1

    # ---- slots -----------------------------------------------------------------------------------------
    def activate(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Slots for one step's adapters (ids; 0, the base model, is ignored): those not in a slot are loaded
        into the least recently used slots that no adapter of this step holds."""
        wanted = list(dict.fromkeys(i for i in lora_ids if i))
        if len(wanted) > len(self._slots):
            raise LoRAError(f"a step runs {len(wanted)} adapters but there are {len(self._slots)} slots (max_loras)")
        slots = {i: self._slots.index(i) for i in wanted if i in self._slots}
        for lora_id in wanted:
            if lora_id not in slots:
                taken = set(slots.values())
                slots[lora_id] = slot = next(s for s in self._slot_lru if s not in taken)
                self._load_slot(slot, lora_id)
            self._slot_lru.move_to_end(slots[lora_id])
        return slots

    def _load_slot(self, slot: int, lora_id: int) -> None:
        adapter = self._host_weights(lora_id)
        for name, layer in self.layers.items():
            layer.set_slot(slot, adapter.weights.get(name))
        self._slots[slot] = lora_id
        self.stats["slot_loads"] += 1
        self._trim()  # adapters whose requests are done since may leave host memory now

    def mapping(self, lora_ids: list[int], query_lens: list[int]) -> LoRAMapping | None:
        """The forward context's LoRA groups for a batch of sequences (each its adapter id, 0 for the base model,
        and its rows); None when no row runs an adapter."""
        if not any(lora_ids):
            return None
        slots = self.activate(lora_ids)
        spans, row = [], 0
        for lora_id, n in zip(lora_ids, query_lens):
            if lora_id:
                spans.append((slots[lora_id], row, row + n))
            row += n
        return LoRAMapping.from_spans(spans, self.device)
