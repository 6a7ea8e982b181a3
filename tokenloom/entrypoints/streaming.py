"""Streaming plumbing shared by both APIs: merging a request's streams, client-disconnect handling, the per-choice
text/token deltas, and the two framings: server-sent events (OpenAI, ending in `data: [DONE]`) and
newline-delimited JSON (Ollama, ending with the done=true object)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from tokenloom.engine.outputs import CompletionOutput, RequestOutput
from tokenloom.engine.async_engine import RequestStream
from tokenloom.entrypoints.server_state import APIError, ServedModel, error_for

_DONE = object()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several request streams as they come; closing it aborts them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream):
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def final_outputs(state: ServedModel, streams: list[RequestStream]) -> AsyncIterator[RequestOutput]:
    """Final outputs in prompt order (all run concurrently in the engine)."""
    try:
        outs = {}
        async for i, out in merge_streams(streams):
            if out.finished:
                state.observe(out)
                outs[i] = out
    except asyncio.CancelledError:
        state.observe_aborted()
        raise
    for i in range(len(streams)):
        yield outs[i]


def close_all(streams: list[RequestStream]) -> BackgroundTask:
    """Runs after a streamed response ends however it ended (even if its body never started): aborts leftovers."""
    def close():
        for s in streams:
            s.close()

    return BackgroundTask(close)


async def until_disconnected(request: Request, coro):
    """Await coro, cancelling it (which aborts its requests) if the client disconnects first."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001
        pass
    raise APIError(499, "client disconnected", code="client_closed_request")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class DeltaTracker:
    """What of each completion's cumulative text/tokens has been sent already."""

    def __init__(self):
        self.text: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def delta(self, key: int, o: CompletionOutput) -> tuple[str, int, int]:
        """(new text, first new token index, end token index)."""
        sent = self.text.get(key, 0)
        t0 = self.tokens.get(key, 0)
        text = o.text[sent:] if len(o.text) > sent else ""
        self.text[key] = max(sent, len(o.text))
        self.tokens[key] = len(o.token_ids)
        return text, t0, len(o.token_ids)


def aborted_chunks(base: dict, open_choices, empty: dict) -> list[dict]:
    """Chunks closing each choice still open when the engine ends a stream (shutdown): finish_reason abort;
    empty: the choice's content fields with nothing in them ({"delta": {}} or {"text": ""})."""
    return [{**base, "choices": [{"index": i, **empty, "logprobs": None, "finish_reason": "abort"}]}
            for i in sorted(open_choices)]


# ---- server-sent events (OpenAI) --------------------------------------------------------------------------
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer the stream


def sse_frame(obj) -> str:
    return f"data: {dumps(obj)}\n\n"


async def sse_events(state: ServedModel, streams, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events of a streaming endpoint: its chunks, then [DONE]. An engine error mid-stream becomes an
    error event (then [DONE]); a client that leaves early counts as aborted. The streams are closed either way."""
    finished = False
    try:
        async for chunk in chunks:
            yield sse_frame(chunk)
        finished = True
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - engine error mid-stream: tell the client, then end the stream
        finished = True
        yield sse_frame(error_for(exc).openai_body())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            state.observe_aborted()
        for s in streams:
            s.close()


def sse_response(state: ServedModel, streams: list[RequestStream], chunks: AsyncIterator[dict]) -> StreamingResponse:
    return StreamingResponse(sse_events(state, streams, chunks), media_type="text/event-stream", headers=SSE_HEADERS,
                             background=close_all(streams))


# ---- newline-delimited JSON (Ollama) -----------------------------------------------------------------------
async def ndjson_lines(state: ServedModel, streams, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """One JSON object per line: the chunks, the last with done=true. An engine error mid-stream becomes an
    {"error": message} line; a client that leaves before the done=true object counts as aborted. The streams are
    closed either way."""
    finished = False
    try:
        async for chunk in chunks:
            if chunk.get("done"):
                finished = True
            yield dumps(chunk) + "\n"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        finished = True
        yield dumps({"error": error_for(exc).message}) + "\n"
    finally:
        if not finished:
            state.observe_aborted()
        for s in streams:
            s.close()


def ndjson_response(state: ServedModel, streams: list[RequestStream], chunks: AsyncIterator[dict]
                    ) -> StreamingResponse:
    return StreamingResponse(ndjson_lines(state, streams, chunks), media_type="application/x-ndjson",
                             background=close_all(streams))
