"""The engine behind the server: one background thread owns an LLMEngine and steps it while there is work.

Everything that touches the engine (adding and aborting requests, stepping, embedding forwards) happens on
that thread. Other threads (the asyncio event loop of the HTTP server) talk to it through a command queue,
which the thread drains between steps, and get results back through per-request ``asyncio.Queue`` objects fed
with ``loop.call_soon_threadsafe``. Many clients therefore share one continuously batched engine.

    aengine = AsyncEngine(llm.engine).start()
    stream = await aengine.add_request("Hello", SamplingParams(max_tokens=8))   # errors raise here
    async for out in stream:  # cumulative RequestOutput objects, the last one has out.finished
        ...

Leaving the ``async for`` early (client disconnect, cancellation) aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


from tokenloom.config import TokenloomError
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.outputs import EngineStats, RequestOutput
from tokenloom.sampling_params import SamplingParams

log = logging.getLogger("tokenloom.server")


class QueueFullError(TokenloomError):
    """More requests are waiting than the server accepts (--max-queue)."""


class EngineDeadError(TokenloomError):
    """The engine thread is not running (shut down, or crashed)."""


class RequestAbortedError(TokenloomError):
    """The request was aborted by someone other than its consumer (e.g. server shutdown)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    started: bool = False  # produced its first output (no longer counted as waiting)


class RequestStream:
    """Async iterator over one request's cumulative outputs. Closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self.last: RequestOutput | None = None
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
            # Outputs are cumulative: when the consumer fell behind, skip straight to the newest one.
            while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
                item = self._queue.get_nowait()
        except BaseException:  # cancelled while waiting (client gone): abort
            self.close()
            raise
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        self.last = item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Abort the request if it is still running (idempotent, safe from any thread)."""
        if not self.finished and not self._closed:
            self._closed = True
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def collect(self) -> RequestOutput:
        """Run to the end and return the final output."""
        try:
            async for _ in self:
                pass
        finally:
            self.close()
        assert self.last is not None
        return self.last


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 1.0):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self._idle_wait_s = idle_wait_s
        self._cv = threading.Condition()
        self._cmds: deque[tuple[str, tuple]] = deque()
        self._streams: dict[str, _Stream] = {}  # touched only by the engine thread
        self._thread: threading.Thread | None = None
        self._stop = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        # Counted under _cv: adds still in the command queue + requests in the scheduler's waiting queue.
        self._pending_adds = 0
        self._engine_waiting = 0
        self._stats: EngineStats = engine.stats()
        self.step_listeners: list[Callable[[int, float], None]] = []  # (sequences in the step, step seconds)
        self.last_step_num_seqs = 0
        self.max_step_num_seqs = 0

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenloom-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still running are aborted and their consumers get an error."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def has_unfinished(self) -> bool:
        st = self._stats
        return bool(st.num_running or st.num_waiting or self._pending_adds)

    # ---- the public, thread-safe API -------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                          max_waiting: int | None = None, lora_request=None) -> RequestStream:
        """Queue a request; returns its output stream. TokenloomError (context window, bad prompt, invalid
        sampling values, full queue; lora.LoRAError for an adapter that does not fit) is raised here, before
        anything streams. lora_request: a lora.LoRARequest (an adapter not yet added is read on the engine
        thread: add it first, LLMEngine.add_lora through run_on_engine, to keep steps from waiting on that)."""
        loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        if params.structured_outputs is not None:
            await self.compile_constraint(params)
        queue: asyncio.Queue = asyncio.Queue()
        done: asyncio.Future = loop.create_future()
        with self._cv:
            if self._dead is not None or self._stop or self._thread is None:
                why = f": {self._dead}" if getattr(self._dead, "fatal", False) else ""
                raise EngineDeadError(f"the engine is not running{why}")
            if max_waiting is not None and self._queued_beyond_free_slots() >= max_waiting:
                raise QueueFullError(f"the server is busy: {max_waiting} requests are already waiting for a free "
                                     "sequence slot; retry later")
            self._pending_adds += 1
            self._cmds.append(("add", (prompt, params, request_id, lora_request, loop, queue, done)))
            self._cv.notify()
        try:
            await done  # raises the engine's TokenloomError, if any
        except asyncio.CancelledError:  # the caller went away while the request was being queued
            self.abort(request_id)
            raise
        return RequestStream(self, request_id, queue)

    async def compile_constraint(self, params: SamplingParams) -> None:
        """Compile the request's output constraint on the grammar threads, so the engine thread only picks up
        the cached result; a bad or too slow constraint raises here."""
        manager = self.engine.structured_output
        fut = manager.grammar_async(params.structured_outputs)
        waiting = asyncio.wrap_future(fut)
        await asyncio.wait([waiting], timeout=manager.config.compile_timeout_s)  # never cancels the compile
        if waiting.done() and not waiting.cancelled():
            waiting.exception()  # seen here; raised from fut just below
        manager.result(fut, timeout=0)

    def abort_all(self, message: str) -> None:
        """End every request now: each consumer gets RequestAbortedError(message) (a server's drain deadline)."""
        with self._cv:
            self._cmds.append(("abort_all", (message,)))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._cmds.append(("abort", (request_id,)))
            self._cv.notify()

    async def run_on_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between two steps and return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        with self._cv:
            if self._dead is not None or self._stop or self._thread is None:
                why = f": {self._dead}" if getattr(self._dead, "fatal", False) else ""
                raise EngineDeadError(f"the engine is not running{why}")
            self._cmds.append(("call", (fn, loop, done)))
            self._cv.notify()
        return await done

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Pooled, L2-normalised final hidden states of each token-id prompt (LLMEngine.embed)."""
        for p in prompts:
            if not p:
                raise TokenloomError("input is empty")
            if len(p) > self.max_model_len:
                raise TokenloomError(
                    f"input is {len(p)} tokens, but the context window is {self.max_model_len} tokens")
            vocab = self.model_config.vocab_size
            if min(p) < 0 or max(p) >= vocab:
                raise TokenloomError(f"input token ids must be in [0, {vocab})")
        return await self.run_on_engine(lambda eng: eng.embed(prompts))

    def stats(self) -> EngineStats:
        """Engine statistics as of the end of the engine thread's last iteration."""
        return self._stats

    def _queued_beyond_free_slots(self) -> int:
        """Requests queued (not yet added, or waiting in the scheduler) that the free sequence slots cannot
        take at once: what --max-queue bounds, so a request that can start now is never refused. Under _cv."""
        free = self.engine.config.scheduler.max_num_seqs - self._stats.num_running
        return self._pending_adds + self._engine_waiting - max(0, free)

    def num_waiting(self) -> int:
        with self._cv:
            return self._pending_adds + self._engine_waiting

    # ---- the engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - engine bug: fail everyone, refuse new work
            log.exception("engine thread crashed")
            with self._cv:
                self._dead = exc
            self._fail_all(EngineDeadError(str(exc) if getattr(exc, "fatal", False) else f"the engine crashed: {exc}"))
        finally:
            with self._cv:
                self._dead = self._dead or EngineDeadError("the engine was shut down")
                cmds = list(self._cmds)
                self._cmds.clear()
            for kind, args in cmds:  # answer anyone still waiting on a command
                if kind in ("add", "call"):
                    loop, done = args[-3 if kind == "add" else 1], args[-1]
                    _resolve(loop, done, exc=EngineDeadError("the engine was shut down"))
            self._fail_all(RequestAbortedError("the server is shutting down"))
            try:
                self.engine.shutdown()  # a parallel model's worker ranks go with the engine thread
            except Exception:  # pragma: no cover
                log.exception("stopping the executor failed")

    def _loop(self) -> None:
        eng = self.engine
        while True:
            busy = eng.has_unfinished()
            with self._cv:
                if not busy and not self._cmds and not self._stop:
                    self._cv.wait(self._idle_wait_s)
                if self._stop:
                    return
                cmds = list(self._cmds)
                self._cmds.clear()
            n_adds = 0
            for kind, args in cmds:
                if kind == "add":
                    n_adds += 1
                    self._do_add(*args)
                elif kind == "abort":
                    self._do_abort(args[0])
                elif kind == "abort_all":
                    self._fail_all(RequestAbortedError(args[0]))
                else:
                    self._do_call(*args)
            if eng.has_unfinished():
                t0 = time.perf_counter()
                try:
                    outputs = eng.step()
                except Exception as exc:
                    if getattr(exc, "fatal", False):  # the model cannot run any more (a parallel rank died)
                        raise
                    log.exception("engine step failed")
                    self._fail_all(exc if isinstance(exc, TokenloomError) else TokenloomError(f"engine error: {exc}"))
                    outputs = []
                dt = time.perf_counter() - t0
                n_seqs = eng.last_step_num_seqs
                if n_seqs:
                    self.last_step_num_seqs = n_seqs
                    self.max_step_num_seqs = max(self.max_step_num_seqs, n_seqs)
                    for fn in self.step_listeners:
                        try:
                            fn(n_seqs, dt)
                        except Exception:  # pragma: no cover
                            log.exception("step listener failed")
                self._dispatch(outputs)
            else:  # idle: free KV blocks go back to the OS (steps do this themselves)
                eng.release_free_memory()
            st = eng.stats()
            with self._cv:
                self._pending_adds -= n_adds
                self._engine_waiting = st.num_waiting
                self._stats = st

    def _do_add(self, prompt, params, request_id, lora_request, loop, queue, done) -> None:
        try:
            if request_id in self._streams:
                raise TokenloomError(f"request id '{request_id}' is already in use")
            self.engine.add_request(prompt, params, request_id, lora_request=lora_request)
        except Exception as exc:
            _resolve(loop, done, exc=exc if isinstance(exc, TokenloomError) else TokenloomError(str(exc)))
            return
        self._streams[request_id] = _Stream(loop, queue)
        _resolve(loop, done, result=request_id)

    def _do_abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # already finished
        self.engine.abort_request(request_id)
        _put(stream.loop, [(stream.queue, RequestAbortedError(f"request {request_id} was aborted"))])

    def _do_call(self, fn, loop, done) -> None:
        try:
            result = fn(self.engine)
        except Exception as exc:
            _resolve(loop, done, exc=exc)
        else:
            _resolve(loop, done, result=result)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            for o in out.outputs:  # the engine keeps appending to these lists: hand out snapshots
                if o.logprobs is not None:
                    o.logprobs = list(o.logprobs)
            if out.finished:
                del self._streams[out.request_id]
            per_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in per_loop.items():
            if not _put(loop, items):  # the consumer's loop is gone: nobody will read these
                for _, out in items:
                    if not out.finished:
                        self._streams.pop(out.request_id, None)
                        self.engine.abort_request(out.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            try:
                self.engine.abort_request(rid)
            except Exception:  # pragma: no cover
                pass
            _put(stream.loop, [(stream.queue, exc)])


def _put(loop: asyncio.AbstractEventLoop, items: list) -> bool:
    def deliver():
        for q, item in items:
            q.put_nowait(item)

    try:
        loop.call_soon_threadsafe(deliver)
        return True
    except RuntimeError:  # loop closed
        return False


def _resolve(loop, fut: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    def settle():
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
