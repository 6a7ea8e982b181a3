"""Prefill/decode disaggregation: `tokenloom serve MODEL --prefill-workers N --decode-workers M`.

Prompts are computed by prefill workers and decoded by decode workers, each an engine in a process of its own
(engine.process_client), so a long prompt never stalls the decode steps of the requests already generating.

One request: the least loaded decode worker is picked first, then the least loaded prefill worker, which is told
how many of the prompt's leading blocks that decode worker already holds (this front keeps, per decode worker,
the prefix-cache hashes of the prompts it sent there: a hint, checked on arrival). The prefill worker computes
the prompt, samples the first token (streamed to the client at once), writes the prompt's other blocks to shared
memory (engine.kv_connector, worker.kv_transfer) and frees its own. The decode worker adopts what its prefix
cache holds, copies the rest in, and decodes from the first token on, computing no prompt token. A transfer that
fails (a prefill worker that died or timed out, a segment that cannot be read, a hint gone stale) makes the
decode worker compute the prompt itself, with the same output. Aborting a request at any stage frees its blocks
on both sides and drops its segment.

Same output as one engine: greedy is token for token (the decode side reads the very K/V the prefill side
wrote, and runs the first token as a decode, as one engine would); seeded sampling too (the request's generator
state travels with its K/V). Unseeded random sampling draws from each engine's own generator, so it differs
from a single engine's draws, as it does between any two batch orders.

Not split (run whole on a decode worker): n > 1, best_of, prompt logprobs, output constraints. Not supported:
LoRA adapters, speculative decoding, tensor/pipeline parallel workers (both sides run one process each).
Across hosts (torch.distributed, Ray) is out of scope: the hand-off is a file in /dev/shm.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import glob
import itertools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tokenloom.config import EngineConfig, TokenloomError
from tokenloom.engine.async_engine import EngineDeadError, QueueFullError, RequestAbortedError, RequestStream
from tokenloom.engine.data_parallel import EngineSet, start_workers
from tokenloom.engine.kv_connector import prompt_block_hashes
from tokenloom.engine.process_client import ProcessEngine
from tokenloom.sampling_params import SamplingParams
from tokenloom.worker.kv_transfer import SHM_DIR

TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class TransferStats:
    """KV hand-offs as the decode workers report them (the server's kv_transfer metrics read these)."""
    blocks: int = 0  # blocks copied in
    bytes: int = 0
    transfers: int = 0
    fallbacks: int = 0  # requests whose prompt the decode side computed itself
    blocks_skipped: int = 0  # leading blocks not sent: the decode worker held them
    seconds_sum: float = 0.0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(TRANSFER_BUCKETS) + 1))

    def observe(self, seconds: float) -> None:
        self.seconds_sum += seconds
        self.bucket_counts[bisect.bisect_left(TRANSFER_BUCKETS, seconds)] += 1


@dataclass(eq=False)
class _Request:
    request_id: str
    prefill: ProcessEngine
    decode: ProcessEngine
    queue: asyncio.Queue
    arrival: float
    inner: RequestStream | None = None  # the decode worker's stream, once it has the request
    aborted: bool = False
    task: asyncio.Task | None = None


class DisaggEngine(EngineSet):
    def __init__(self, config: EngineConfig, prefill_workers: int = 1, decode_workers: int = 1, threads: int = 1,
                 transfer_timeout_s: float = 120.0):
        """threads: torch threads of each worker process (one per core is the sensible share)."""
        if prefill_workers < 1 or decode_workers < 1:
            raise TokenloomError("--prefill-workers and --decode-workers must both be at least 1")
        if config.speculative is not None or config.lora is not None:
            raise TokenloomError("prefill/decode disaggregation does not support speculative decoding or LoRA")
        parallel = getattr(config, "parallel", None)
        if parallel is not None and parallel.world_size > 1:
            raise TokenloomError("prefill/decode disaggregation runs each worker in one process: tensor/pipeline "
                                 "parallel sizes must be 1")
        specs = [("prefill", f"prefill{i}") for i in range(prefill_workers)]
        specs += [("decode", f"decode{i}") for i in range(decode_workers)]
        workers = start_workers(config, specs, threads)
        super().__init__(workers)
        self.prefill, self.decode = workers[:prefill_workers], workers[prefill_workers:]
        self.block_size = self.decode[0].block_size
        self.hints = config.cache.enable_prefix_caching
        self._held = {id(d): OrderedDict() for d in self.decode}  # per decode worker: hashes sent there
        self.transfer_timeout_s = transfer_timeout_s
        self.transfer = TransferStats()
        for d in self.decode:
            d.transfer_listeners.append(lambda report, d=d: self._on_transfer(d, report))
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.drop_segments = False  # tests: lose every hand-off on the way (the decode side must recompute)

    # ---- requests ------------------------------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                          max_waiting: int | None = None, lora_request=None) -> RequestStream:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise TokenloomError(f"request id '{request_id}' is already in use")
        decode = self.least_loaded(self.decode)
        if lora_request is not None or not _splittable(params):
            return await decode.add_request(prompt, params, request_id, max_waiting, lora_request)
        if max_waiting is not None and decode._queued_beyond_free_slots() >= max_waiting:
            raise QueueFullError(f"the server is busy: {max_waiting} requests are already waiting for a free "
                                 "sequence slot; retry later")
        ids = self._token_ids(prompt)
        try:
            prefill = self.least_loaded(self.prefill)
        except EngineDeadError:  # no prefill worker left: the decode workers do it all
            return await decode.add_request(ids, params, request_id, max_waiting)
        hashes = prompt_block_hashes(ids, self.block_size) if self.hints else []
        held = self._held[id(decode)]
        skip = next((i for i, h in enumerate(hashes) if h not in held), len(hashes))
        req = _Request(request_id, prefill, decode, asyncio.Queue(), time.perf_counter())
        self._requests[request_id] = req
        try:
            done = await prefill.submit_prefill(request_id, ids, params, skip)
        except EngineDeadError:
            del self._requests[request_id]
            return await decode.add_request(ids, params, request_id, max_waiting)
        except BaseException:
            self._requests.pop(request_id, None)
            raise
        self.transfer.blocks_skipped += skip
        req.task = asyncio.create_task(self._drive(req, done, ids, params, hashes))
        return RequestStream(self, request_id, req.queue)

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise TokenloomError("this model has no tokenizer: pass prompts as token ids")
        return self.tokenizer.encode(prompt)

    async def _drive(self, req: _Request, done, ids: list[int], params: SamplingParams, hashes: list[int]) -> None:
        """Wait for the prefill, pass its first token on, hand the request to its decode worker, relay it."""
        try:
            try:
                out, handoff, goes_on = await asyncio.wait_for(asyncio.wrap_future(done), self.transfer_timeout_s)
            except (RequestAbortedError, asyncio.CancelledError):
                return  # aborted: abort() told the consumer
            except Exception:  # noqa: BLE001 - prefill failed, died or timed out: the decode worker recomputes
                if req.aborted:
                    return
                req.prefill.abort(req.request_id)
                self.transfer.fallbacks += 1
                await self._relay(req, await req.decode.add_request(ids, params, req.request_id), hashes)
                return
            if req.aborted:
                if handoff is not None:
                    handoff.segment.unlink()
                return
            out.metrics.arrival_time = req.arrival
            if not goes_on:  # the first token ended it (EOS, stop, max_tokens 1, the context)
                _put(req.queue, out)
                return
            first = out.outputs[0]
            if self.drop_segments and handoff is not None:
                handoff.segment.unlink()
            _put(req.queue, _unfinished(out))
            lp = first.logprobs[0] if first.logprobs else None
            cmd = ("add_prefilled", req.request_id, ids, params, first.token_ids[0], lp, handoff,
                   out.metrics.first_token_time)
            try:
                inner = await req.decode.submit(cmd, req.request_id)
            except BaseException:
                if handoff is not None:
                    handoff.segment.unlink()
                raise
            await self._relay(req, inner, hashes)
        except Exception as exc:  # noqa: BLE001 - the consumer gets the error instead of a hang
            _put(req.queue, exc)
        finally:
            self._requests.pop(req.request_id, None)

    async def _relay(self, req: _Request, inner: RequestStream, hashes: list[int]) -> None:
        req.inner = inner
        if req.aborted:
            inner.close()
            return
        held = self._held[id(req.decode)]
        for h in hashes:  # once loaded there, the decode worker's prefix cache holds them
            held[h] = None
            held.move_to_end(h)
        while len(held) > req.decode.num_blocks:
            held.popitem(last=False)
        async for out in inner:
            out.metrics.arrival_time = req.arrival
            _put(req.queue, out)

    def abort(self, request_id: str, message: str | None = None) -> None:
        req = self._requests.get(request_id)
        if req is None:  # not split (or over): the decode workers know it, if anyone does
            for d in self.decode:
                d.abort(request_id)
            return
        if req.aborted:
            return
        req.aborted = True
        req.prefill.abort(request_id)
        if req.inner is not None:
            req.inner.close()
        _put(req.queue, RequestAbortedError(message or f"request {request_id} was aborted"))

    def abort_all(self, message: str) -> None:
        for rid in list(self._requests):
            req = self._requests.get(rid)
            if req is not None and not req.aborted:
                self.abort(rid, message)
        super().abort_all(message)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or super().has_unfinished()

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        for w in self.prefill:  # hand-offs a worker made that nobody took (a crash, a kill)
            for path in glob.glob(os.path.join(SHM_DIR, f"tokenloom-kv-*-{w.process.pid}-*")):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def kv_transfer_stats(self) -> TransferStats:
        return self.transfer

    def _on_transfer(self, decode: ProcessEngine, report: dict) -> None:
        t = self.transfer
        if report.get("error"):
            t.fallbacks += 1
            if "skipped" in report["error"]:  # the worker evicted blocks we thought it held: trust no hint of it
                self._held[id(decode)].clear()
            return
        t.transfers += 1
        t.blocks += report["blocks"]
        t.bytes += report["bytes"]
        t.observe(report["latency"])


def _splittable(params: SamplingParams) -> bool:
    return (params.n == 1 and (params.best_of or 1) <= 1 and params.prompt_logprobs is None
            and params.structured_outputs is None)


def _unfinished(out):
    """The prefill side's output of the first token, as one step of a request that goes on."""
    outputs = [dataclasses.replace(o, finish_reason=None, stop_reason=None) for o in out.outputs]
    return dataclasses.replace(out, outputs=outputs, finished=False)


def _put(q: asyncio.Queue, item) -> None:
    q.put_nowait(item)
