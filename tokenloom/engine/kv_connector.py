"""The engine's half of prefill/decode disaggregation: a KV connector that hands a request's prompt K/V from the
engine that computed it (prefill side) to the engine that decodes it (decode side).

Prefill side: `mark_export` caps a request at its first token; when it finishes, before its blocks are freed,
the prompt's blocks (all of them, the partial last one too, but for the leading ones the decode side is known to
hold) are written to a shared-memory segment (worker.kv_transfer), and `take_handoff` gives the segment and the
request's sampling-generator state to whoever moves them on.

Decode side: `add_prefilled` queues the request with its first token already output and the segment attached.
At admission the scheduler asks `num_external_tokens` (prompt tokens beyond its own prefix-cache hits that the
segment supplies), allocates the blocks, and calls `load`, which copies the missing blocks in and registers the
full ones in the prefix cache; the request then starts with its first decode, so the decode side computes no
prompt token. A segment that cannot be used (gone, truncated, another layout, other hashes, or a block the
sender skipped that is no longer cached here) makes the request compute its prompt here instead; its output is
the same, since the scheduler still runs its first token as a decode (Scheduler._chunk_end).

Requests with n > 1, best_of, prompt logprobs, an output constraint or a LoRA adapter are not split: the
orchestrator (engine.disagg) sends them whole to a decode worker.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from tokenloom.core.kv_cache_manager import chain_hash
from tokenloom.sampling_params import SamplingParams
from tokenloom.worker.kv_transfer import KVSegment, KVTransferError, export_blocks, import_blocks, segment_path


def prompt_block_hashes(token_ids: list[int], block_size: int, seed=None) -> list[int]:
    """The chained prefix-cache hashes of a prompt's full blocks, as kv_cache_manager names them."""
    hashes, parent = [], seed
    for i in range(len(token_ids) // block_size):
        parent = chain_hash(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


@dataclass
class Handoff:
    """What the prefill side passes on: the K/V segment and the seeded generator's state after the first token."""
    segment: KVSegment | None
    generator_state: object = None


@dataclass
class _Export:
    skip_blocks: int  # leading blocks the decode side holds already: not written


@dataclass
class _Import:
    segment: KVSegment | None
    done: bool = False  # loaded, or given up on: the request computes whatever it lacks itself


class KVConnector:
    def __init__(self, engine):
        self.engine = engine
        engine.scheduler.kv_connector = self
        self.block_size = engine.kv_cache_manager.block_size
        self._handoffs: dict[str, Handoff] = {}  # finished prefill requests' hand-offs, until taken
        self.counters = dict(blocks_sent=0, bytes_sent=0, export_seconds=0.0, blocks_received=0, bytes_received=0,
                             blocks_held=0, import_seconds=0.0, transfers=0, fallbacks=0)
        self.reports: list[dict] = []  # each load's (or failure's) figures since taken (the engine process sends them)

    def _caches(self):
        return self.engine.executor.kv_caches

    # ---- prefill side ------------------------------------------------------------------------------------
    def mark_export(self, request_id: str, skip_blocks: int = 0) -> None:
        """Run this (just added) request to its first token only, then export its prompt's K/V."""
        req = self.engine.output_processor.groups[request_id].requests[0]
        req.max_tokens = 1
        req.kv_transfer = _Export(skip_blocks)

    def take_handoff(self, request_id: str) -> Handoff | None:
        return self._handoffs.pop(request_id, None)

    def _export(self, req, spec: _Export) -> None:
        start = time.perf_counter()
        bs, n_prompt = self.block_size, req.num_prompt_tokens
        num_blocks = -(-n_prompt // bs)
        skip = min(spec.skip_blocks, n_prompt // bs)  # only full blocks can be held elsewhere
        path = segment_path("prefill")
        layout, nbytes = export_blocks(self._caches(), req.block_table[skip:num_blocks], bs, path)
        seconds = time.perf_counter() - start
        segment = KVSegment(path, n_prompt, bs, prompt_block_hashes(req.prompt_token_ids, bs, req.lora_hash_seed),
                            skip, num_blocks - skip, layout, nbytes, seconds)
        state = req.generator.get_state() if req.generator is not None else None
        self._handoffs[req.group_id] = Handoff(segment, state)
        c = self.counters
        c["blocks_sent"] += num_blocks - skip
        c["bytes_sent"] += nbytes
        c["export_seconds"] += seconds

    # ---- decode side -------------------------------------------------------------------------------------
    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, first_token: int,
                      first_logprobs: dict | None, handoff: Handoff, first_token_time: float | None = None) -> str:
        """Queue a request whose prompt ran elsewhere: its first token is output already, its prompt's K/V is in
        handoff.segment (None: compute the prompt here)."""
        eng = self.engine
        eng.add_request(prompt_token_ids, params, request_id)
        group = eng.output_processor.groups[request_id]
        req = group.requests[0]
        req.output_token_ids.append(int(first_token))
        if first_logprobs is not None:
            req.logprobs.append(dict(first_logprobs))
        if handoff.generator_state is not None and req.generator is not None:
            req.generator.set_state(handoff.generator_state)  # continue the seeded stream where prefill left it
        if req.detokenizer is not None:
            req.detokenizer.add([int(first_token)])
            req.text = req.detokenizer.text
        req.first_token_time = group.metrics.first_token_time = first_token_time or time.perf_counter()
        req.kv_transfer = _Import(handoff.segment)
        return request_id

    def num_external_tokens(self, req, num_cached: int) -> int:
        """Prompt tokens beyond the num_cached found in the prefix cache that the request's segment supplies."""
        spec = req.kv_transfer
        if not isinstance(spec, _Import) or spec.done or spec.segment is None:
            return 0
        seg, bs = spec.segment, self.block_size
        problem = None
        if seg.block_size != bs or seg.num_prompt_tokens != req.num_prompt_tokens:
            problem = "another block size or prompt"
        elif seg.block_hashes != prompt_block_hashes(req.prompt_token_ids, bs, req.lora_hash_seed):
            problem = "other block hashes"
        elif num_cached < seg.first_block * bs:
            problem = "blocks the sender skipped are no longer cached here"
        if problem is not None:
            self._give_up(spec, problem)
            return 0
        if num_cached >= req.num_prompt_tokens:  # every block is cached here
            self._give_up(spec, None)
            return 0
        return req.num_prompt_tokens - num_cached

    def load(self, req, num_cached_blocks: int) -> bool:
        """Copy the segment's blocks the request lacks into its freshly allocated blocks; False (the request
        computes them instead) when the segment cannot be read."""
        spec = req.kv_transfer
        seg = spec.segment
        start = time.perf_counter()
        skip = num_cached_blocks - seg.first_block
        blocks = req.block_table[num_cached_blocks : seg.first_block + seg.num_blocks]
        try:
            nbytes = import_blocks(self._caches(), blocks, seg, skip)
        except KVTransferError as exc:
            self._give_up(spec, str(exc))
            return False
        spec.done, spec.segment = True, None
        seg.unlink()
        seconds = time.perf_counter() - start
        self.engine.kv_cache_manager.cache_full_blocks(req)  # the received full blocks serve later prompts too
        c = self.counters
        c["transfers"] += 1
        c["blocks_received"] += len(blocks)
        c["blocks_held"] += num_cached_blocks
        c["bytes_received"] += nbytes
        c["import_seconds"] += seconds
        self.reports.append(dict(blocks=len(blocks), bytes=nbytes, latency=time.monotonic() - seg.created))
        return True

    def _give_up(self, spec: _Import, problem: str | None) -> None:
        if spec.segment is not None:
            spec.segment.unlink()
        spec.segment, spec.done = None, True
        if problem is not None:
            self.counters["fallbacks"] += 1
            self.reports.append(dict(blocks=0, bytes=0, latency=None, error=problem))

    # ---- both ----------------------------------------------------------------------------------------------
    def request_finished(self, req) -> None:
        """Called by the scheduler before a request's blocks are freed (finished or aborted)."""
        spec = req.kv_transfer
        if isinstance(spec, _Export):
            if req.finish_reason is not None and req.group_id not in self._handoffs and req.output_token_ids:
                self._export(req, spec)
        elif isinstance(spec, _Import) and spec.segment is not None:  # aborted before it was loaded
            spec.segment.unlink()
            spec.segment, spec.done = None, True
