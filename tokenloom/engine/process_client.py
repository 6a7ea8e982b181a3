"""The parent side of an engine worker process (engine.engine_process): ProcessEngine speaks AsyncEngine's
interface (add_request -> a stream of RequestOutputs, abort, abort_all, stats, num_waiting, embed, shutdown, the
step listeners the metrics use), so the server and the benchmarks use either without telling them apart.

One sender thread writes commands to the child's pipe (the event loop never blocks on a busy child); one reader
thread reads its messages and hands outputs to each request's asyncio queue. A child that dies (killed, crashed)
fails every request it had with EngineDeadError, and refuses new ones: nothing waits on it forever.

LoRA adapters and run_on_engine (a Python callable into the engine) stay with in-process engines.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import queue as queue_mod
import threading
from dataclasses import dataclass

from tokenloom.config import EngineConfig, TokenloomError
from tokenloom.engine.async_engine import EngineDeadError, QueueFullError, RequestAbortedError, RequestStream
from tokenloom.engine.engine_process import run_engine_process
from tokenloom.engine.outputs import EngineStats
from tokenloom.sampling_params import SamplingParams

log = logging.getLogger("tokenloom.server")


class EngineInfo:
    """What callers read of the engine object behind an AsyncEngine (model facts), for an engine elsewhere."""

    lora_manager = None

    def __init__(self, info: dict):
        import torch

        self.model_name = info["model_name"]
        self.model_config = info["model_config"]
        self.max_model_len = info["max_model_len"]
        self.model_source = info["model_source"]
        self.config: EngineConfig = info["config"]
        self.tokenizer = info["tokenizer"]
        self.load_time = info["load_time"]
        self.model = torch.nn.Module()  # the weights live in the worker: nothing here


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _error(err) -> BaseException:
    return err if isinstance(err, BaseException) else TokenloomError(str(err))


class ProcessEngine:
    def __init__(self, config: EngineConfig, threads: int = 0, role: str = "engine", name: str = "engine",
                 wait: bool = True):
        """Start the worker process and wait until its model is loaded (TokenloomError if it fails); wait=False:
        call wait_ready() before anything else (several workers load side by side)."""
        ctx = multiprocessing.get_context("spawn")
        self.name, self.role = name, role
        self._conn, child = ctx.Pipe()
        parallel = getattr(config, "parallel", None)
        # a daemon cannot start processes: a replica with tensor/pipeline parallel ranks is not one (it still
        # exits when this process goes, on its pipe's EOF)
        daemon = parallel is None or parallel.world_size == 1
        self.process = ctx.Process(target=run_engine_process, args=(child, config, threads, role),
                                   name=f"tokenloom-{name}", daemon=daemon)
        self.process.start()
        child.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        info = self._wait_ready()
        name = self.name
        self.engine = EngineInfo(info)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.block_size, self.num_blocks = info["block_size"], info["num_blocks"]
        self._stats: EngineStats = info["stats"]
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._futures: dict[tuple[str, object], concurrent.futures.Future] = {}  # (kind, id): acks, replies, prefills
        self._pending_adds = 0
        self._dead: str | None = None
        self._ids = itertools.count()
        self.step_listeners: list = []  # (sequences in the step, step seconds)
        self.transfer_listeners: list = []  # (the decode side's report of one KV load)
        self.last_step_num_seqs = 0
        self.max_step_num_seqs = 0
        self._outbox: queue_mod.Queue = queue_mod.Queue()
        threading.Thread(target=self._send_loop, name=f"tokenloom-{name}-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name=f"tokenloom-{name}-read", daemon=True).start()

    def _wait_ready(self) -> dict:
        while True:
            if self._conn.poll(0.2):
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError):
                    kind, payload = "failed", "the worker process exited"
                if kind == "ready":
                    return payload
                self.process.join(5)
                raise TokenloomError(f"engine worker '{self.name}' failed to start: {payload}")
            if not self.process.is_alive():
                raise TokenloomError(f"engine worker '{self.name}' exited while loading "
                                     f"(exit code {self.process.exitcode})")

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "ProcessEngine":
        return self

    @property
    def is_running(self) -> bool:
        return self._dead is None and self.process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        if not hasattr(self, "_outbox"):  # never got ready
            self.process.terminate()
            self.process.join(timeout)
            return
        if self._dead is None:
            self._outbox.put(("shutdown",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        self._die("the engine was shut down", RequestAbortedError("the server is shutting down"))
        self._outbox.put(None)

    def has_unfinished(self) -> bool:
        if self._dead is not None:
            return False
        st = self._stats
        return bool(st.num_running or st.num_waiting or self._pending_adds or self._streams)

    @property
    def load(self) -> int:
        """Requests this parent has in the worker: what the least-loaded choice of replicas compares."""
        return len(self._streams) + sum(1 for kind, _ in list(self._futures) if kind == "prefill")

    # ---- requests ------------------------------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                          max_waiting: int | None = None, lora_request=None) -> RequestStream:
        if lora_request is not None:
            raise TokenloomError("LoRA adapters need the engine in the server process: serve without "
                                 "--data-parallel-size / --prefill-workers to use them")
        request_id = request_id or f"req-{next(self._ids)}"
        return await self.submit(("add", request_id, prompt, params), request_id, max_waiting)

    async def submit(self, command: tuple, request_id: str, max_waiting: int | None = None) -> RequestStream:
        """Send an add-like command for request_id; its stream once the worker accepted it (its error if not)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._check_alive()
            if request_id in self._streams:
                raise TokenloomError(f"request id '{request_id}' is already in use")
            if max_waiting is not None and self._queued_beyond_free_slots() >= max_waiting:
                raise QueueFullError(f"the server is busy: {max_waiting} requests are already waiting for a free "
                                     "sequence slot; retry later")
            self._streams[request_id] = _Stream(loop, out)
            ack = self._futures[("added", request_id)] = concurrent.futures.Future()
            self._pending_adds += 1
        self._outbox.put(command)
        try:
            await asyncio.wrap_future(ack)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return RequestStream(self, request_id, out)

    async def submit_prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                             skip_blocks: int) -> concurrent.futures.Future:
        """Prefill worker: run the prompt to its first token; returns the future of (output, hand-off, goes on)."""
        with self._lock:
            self._check_alive()
            ack = self._futures[("added", request_id)] = concurrent.futures.Future()
            done = self._futures[("prefill", request_id)] = concurrent.futures.Future()
            self._pending_adds += 1
        self._outbox.put(("prefill", request_id, prompt, params, skip_blocks))
        try:
            await asyncio.wrap_future(ack)
        except BaseException:
            self.abort(request_id)
            raise
        return done

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine worker '{self.name}' is not running ({self._dead})")

    def _queued_beyond_free_slots(self) -> int:
        free = self.engine.config.scheduler.max_num_seqs - self._stats.num_running
        return self._pending_adds + self._stats.num_waiting - max(0, free)

    def num_waiting(self) -> int:
        return self._pending_adds + self._stats.num_waiting

    def abort(self, request_id: str) -> None:
        """End a request: the worker frees its blocks, its consumer gets RequestAbortedError."""
        self._end(request_id, RequestAbortedError(f"request {request_id} was aborted"))

    def _end(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            prefill = self._futures.pop(("prefill", request_id), None)
        if stream is None and prefill is None:
            return
        self._outbox.put(("abort", request_id))
        if stream is not None:
            _put(stream, exc)
        if prefill is not None and not prefill.done():
            prefill.set_exception(exc)

    def abort_all(self, message: str) -> None:
        for rid in list(self._streams) + [rid for kind, rid in list(self._futures) if kind == "prefill"]:
            self._end(rid, RequestAbortedError(message))

    async def compile_constraint(self, params: SamplingParams) -> None:
        """Output constraints are compiled by the worker when the request is added (its error raises there)."""

    async def run_on_engine(self, fn):
        raise TokenloomError("this server runs its engines in worker processes: the operation needs an "
                             "in-process engine (serve without --data-parallel-size / --prefill-workers)")

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        return await asyncio.wrap_future(self.call("embed", prompts))

    def call(self, kind: str, *args) -> concurrent.futures.Future:
        """A command answered by one reply (embed, reset_prefix_cache): the future of its result."""
        key = ("reply", f"call-{next(self._ids)}")
        with self._lock:
            self._check_alive()
            fut = self._futures[key] = concurrent.futures.Future()
        self._outbox.put((kind, key[1], *args))
        return fut

    def reset_prefix_cache(self) -> None:
        self.call("reset_prefix_cache").result()

    def stats(self) -> EngineStats:
        return self._stats

    # ---- the pipe ------------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            cmd = self._outbox.get()
            if cmd is None:
                return
            try:
                self._conn.send(cmd)
            except (OSError, ValueError) as exc:  # the worker is gone; the reader reports it
                log.debug("engine worker %s: send failed: %s", self.name, exc)
                if self._dead is not None:
                    return

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                getattr(self, f"_on_{msg[0]}")(*msg[1:])
        except (EOFError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - a parent-side bug: fail loudly but never hang requests
            log.exception("engine worker %s: bad message", self.name)
            self._die(f"protocol error: {exc}")
            return
        code = self.process.exitcode
        self._die(f"the worker process exited (exit code {code})" if code is not None else "the worker went away")

    def _on_added(self, rid, err, _) -> None:
        with self._lock:
            fut = self._futures.pop(("added", rid), None)
            self._pending_adds = max(0, self._pending_adds - 1)
            if err is not None:
                self._streams.pop(rid, None)
                prefill = self._futures.pop(("prefill", rid), None)
                if prefill is not None:
                    prefill.cancel()
        if fut is not None and not fut.done():
            fut.set_exception(_error(err)) if err is not None else fut.set_result(rid)

    def _on_out(self, outputs, stats, steps) -> None:
        self._stats = stats
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
                if stream is not None and out.finished:
                    del self._streams[out.request_id]
            if stream is not None:
                _put(stream, out)
        for n_seqs, seconds in steps:
            if n_seqs:
                self.last_step_num_seqs = n_seqs
                self.max_step_num_seqs = max(self.max_step_num_seqs, n_seqs)
                for fn in list(self.step_listeners):
                    try:
                        fn(n_seqs, seconds)
                    except Exception:  # noqa: BLE001
                        log.exception("step listener failed")

    def _on_prefilled(self, rid, out, handoff, goes_on) -> None:
        with self._lock:
            fut = self._futures.pop(("prefill", rid), None)
        if fut is None or fut.done():  # aborted meanwhile: nobody takes the hand-off
            if handoff is not None:
                handoff.segment.unlink()
            return
        fut.set_result((out, handoff, goes_on))

    def _on_transfer(self, reports: list[dict]) -> None:
        for report in reports:
            for fn in list(self.transfer_listeners):
                fn(report)

    def _on_reply(self, call_id, err, result) -> None:
        with self._lock:
            fut = self._futures.pop(("reply", call_id), None)
        if fut is not None:
            fut.set_exception(_error(err)) if err is not None else fut.set_result(result)

    def _on_error(self, rid, message) -> None:
        with self._lock:
            stream = self._streams.pop(rid, None)
            prefill = self._futures.pop(("prefill", rid), None)
        if stream is not None:
            _put(stream, TokenloomError(message))
        if prefill is not None:
            prefill.set_exception(TokenloomError(message))

    def _on_dead(self, message) -> None:
        log.error("engine worker %s crashed: %s", self.name, message)
        self._die(f"the worker crashed: {message.splitlines()[0]}")

    def _die(self, reason: str, exc: BaseException | None = None) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                self._stats = dataclasses.replace(self._stats, num_running=0, num_waiting=0)
            streams, self._streams = self._streams, {}
            futures, self._futures = self._futures, {}
        exc = exc or EngineDeadError(f"engine worker '{self.name}' stopped: {reason}")
        for stream in streams.values():
            _put(stream, exc)
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(exc)


def _put(stream: _Stream, item) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the consumer's loop is closed
        pass
