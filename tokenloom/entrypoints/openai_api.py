"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models.

Also holds what both routers share: the per-app ServerState (engine, model name, queue bound, metrics),
APIError (rendered OpenAI-style here and Ollama-style under /api/) and the streaming helpers.
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from tokenloom.config import TokenloomError
from tokenloom.engine.llm_engine import CompletionOutput, RequestOutput
from tokenloom.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from tokenloom.sampling_params import SamplingParams, SamplingParamsError


# ---- errors ------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered to the client: OpenAI-style body under /v1 (and elsewhere), {"error": msg} under /api."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body (every status >= 400 on the OpenAI endpoints)."""
    error: ErrorDetail


def documented_errors(body: type[BaseModel], invalid: str, length_field: str) -> dict[int | str, dict]:
    """The error statuses an API's OpenAPI document lists, each with that API's error body."""
    return {
        400: {"model": body, "description": f"Malformed JSON, wrong types, {invalid}, or a prompt (plus "
                                             f"{length_field}) longer than the context window"},
        401: {"model": body, "description": "Missing or wrong API key (when the server has one)"},
        404: {"model": body, "description": "Unknown model"},
        503: {"model": body, "description": "Too many waiting requests (--max-queue); retry later"},
    }


ERROR_RESPONSES = documented_errors(ErrorResponse, "invalid sampling values", "max_tokens")


def error_for(exc: Exception) -> APIError:
    """Map engine errors onto HTTP errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), type="server_error", code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="engine_unavailable")
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, TokenloomError):
        msg = str(exc)
        code = "context_length_exceeded" if "context window" in msg else None
        return APIError(400, msg, code=code)
    return APIError(500, f"internal error: {exc}", type="server_error")


# ---- per-app state -----------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, engine: AsyncEngine, served_model_name: str, max_queue: int | None = None, metrics=None):
        self.engine = engine
        self.served_model_name = served_model_name
        self.max_queue = max_queue
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._model_info: dict | None = None

    # models
    def model_names(self) -> set[str]:
        return {self.served_model_name}

    def check_model(self, name: str | None, ollama: bool = False) -> str:
        """The served model's name, or APIError 404 for any other name (None = the served model)."""
        if name is None or name == "":
            if ollama:
                raise APIError(400, "model is required", param="model")
            return self.served_model_name
        key = name.removesuffix(":latest") if ollama or name.endswith(":latest") else name
        if key in self.model_names():
            return self.served_model_name
        if ollama:
            raise APIError(404, f"model '{name}' not found", type="not_found_error", param="model",
                           code="model_not_found")
        raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.served_model_name}`)",
                       type="not_found_error", param="model", code="model_not_found")

    # tokenizer
    def require_tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            self._token_text[token_id] = text
        return text

    def chat_prompt_ids(self, messages: list[dict], tools=None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """Messages rendered with the model's chat template, then encoded (the template carries any BOS)."""
        tok = self.require_tokenizer()
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if tok.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                           continue_final_message=continue_final_message, **(template_kwargs or {}))
        except TokenloomError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    # requests
    async def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> RequestStream:
        try:
            return await self.engine.add_request(prompt, params, request_id, max_waiting=self.max_queue)
        except Exception as exc:  # noqa: BLE001 - mapped onto an HTTP status
            raise error_for(exc) from None

    async def submit_all(self, prompts: list[str | list[int]], params: SamplingParams, base_id: str
                         ) -> list[RequestStream]:
        """All prompts or none: a bad one aborts those already queued."""
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.submit(p, params, rid))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    def observe(self, out: RequestOutput) -> None:
        if self.metrics is not None and out.finished:
            self.metrics.observe_finished(out)

    def observe_aborted(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_aborted()


def get_state(request: Request) -> ServerState:
    return request.app.state.tokenloom


# ---- streaming helpers ---------------------------------------------------------------------------------------
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


# ---- schemas -----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Sampling fields common to completions and chat (OpenAI's, then vLLM-style extras)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The served model's name (GET /v1/models); omitted = that model")
    n: int = Field(1, description="Completions per prompt")
    temperature: float | None = Field(None, description="0 = greedy (default 1)")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1] (default 1)")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the output)")
    seed: int | None = Field(None, description="Per-request sampling seed (reproducible sampling)")
    presence_penalty: float | None = Field(None, description="In [-2, 2]")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100]")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true")
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = Field(None, description="Top-k sampling (-1 or 0 = off)")
    min_p: float | None = Field(None, description="Min-p sampling in [0, 1]")
    repetition_penalty: float | None = Field(None, description="> 0; 1 = off")
    min_tokens: int = Field(0, description="Generate at least this many tokens before EOS / stop can end the output")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the output")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


def _sampling_params(req: _SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0, repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
            logit_bias=req.logit_bias, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, a list of texts, a list of token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, description="Tokens to generate (null = up to the context window)")
    logprobs: int | None = Field(None, description="Log probabilities of the top-N tokens per position (0..20)")
    echo: bool = Field(False, description="Prepend the prompt to the completion")
    suffix: str | None = Field(None, description="Not supported (must be empty)")
    best_of: int | None = Field(None, description="Only best_of == n is supported")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class _Choice(BaseModel):
    """What every completion and chat choice carries."""
    index: int
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class _Response(BaseModel):
    """What every completion and chat response carries."""
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., description="The conversation, rendered with the model's chat template")
    max_tokens: int | None = Field(None, description="Deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, description="Tokens to generate (null = up to the context window)")
    logprobs: bool = Field(False, description="Return log probabilities of the output tokens")
    top_logprobs: int | None = Field(None, description="With logprobs: the top-N alternatives per token (0..20)")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'} is supported")
    tools: list[dict] | None = Field(None, description="Passed to the chat template; tool calls are not parsed")
    tool_choice: str | dict | None = Field(None, description="none or auto")
    # vLLM-style extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, texts, token ids, or token-id lists (each at most the context window)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Only the model's hidden size is supported")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenloom"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _stream_doc(what: str) -> dict:
    return {200: {"description": f"{what}; with stream=true, server-sent events (`data: {{chunk}}` frames ending "
                                 "in `data: [DONE]`)",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


router = APIRouter(tags=["OpenAI"])


# ---- /v1/models ----------------------------------------------------------------------------------------------
def _card(state: ServerState) -> dict:
    return {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "tokenloom",
            "max_model_len": state.engine.max_model_len}


@router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
async def list_models(request: Request):
    """The served model."""
    return {"object": "list", "data": [_card(get_state(request))]}


@router.get("/v1/models/{model}", response_model=ModelCard, responses={k: ERROR_RESPONSES[k] for k in (401, 404)})
async def retrieve_model(model: str, request: Request):
    state = get_state(request)
    state.check_model(model)
    return _card(state)


# ---- logprobs formatting -----------------------------------------------------------------------------------
def _completion_logprobs(state: ServerState, o: CompletionOutput, t0: int, t1: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for k in range(t0, t1):
        tid = o.token_ids[k]
        entry = o.logprobs[k] if o.logprobs and k < len(o.logprobs) else {}
        text = state.token_text(tid)
        tokens.append(text)
        token_lps.append(entry.get(tid))
        tops.append({state.token_text(t): lp for t, lp in entry.items()} if entry else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(state: ServerState, o: CompletionOutput, t0: int, t1: int, top_n: int) -> list[dict]:
    content = []
    for k in range(t0, t1):
        tid = o.token_ids[k]
        entry = o.logprobs[k] if o.logprobs and k < len(o.logprobs) else {}
        text = state.token_text(tid)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({
            "token": text, "logprob": entry.get(tid, 0.0), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": state.token_text(t), "logprob": lp,
                              "bytes": list(state.token_text(t).encode("utf-8"))} for t, lp in top],
        })
    return content


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- /v1/completions -----------------------------------------------------------------------------------------
def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**_stream_doc("The completion"), **ERROR_RESPONSES})
async def create_completion(body: CompletionRequest, request: Request):
    """Complete text or token-id prompts (OpenAI legacy completions)."""
    state = get_state(request)
    model = state.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "only best_of == n is supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs (prompt logprobs) is not supported", param="echo")
    prompts = _prompts(body.prompt)
    if any(isinstance(p, str) for p in prompts):
        state.require_tokenizer()
    params = _sampling_params(body, body.max_tokens, body.logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await state.submit_all(prompts, params, rid)
    echo = [(p if isinstance(p, str) else (state.tokenizer.decode(p) if state.tokenizer else "")) if body.echo else ""
            for p in prompts]
    n = params.n
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _sse_response(state, streams, _completion_chunks(state, streams, rid, created, model, n, echo,
                                                              include_usage, body.logprobs))
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=close_all(streams))

    async def run():
        return [out async for out in _finals(state, streams)]

    finals = await until_disconnected(request, run())
    choices, n_prompt, n_out = [], 0, 0
    for i, out in enumerate(finals):
        n_prompt += len(out.prompt_token_ids)
        for o in out.outputs:
            n_out += len(o.token_ids)
            lp = (_completion_logprobs(state, o, 0, len(o.token_ids), len(echo[i]))
                  if body.logprobs is not None else None)
            choices.append({"index": i * n + o.index, "text": echo[i] + o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(n_prompt, n_out), "system_fingerprint": None})


async def _finals(state: ServerState, streams: list[RequestStream]) -> AsyncIterator[RequestOutput]:
    """Final outputs in prompt order (all run concurrently in the engine)."""
    try:
        finals = {}
        async for i, out in merge_streams(streams):
            if out.finished:
                state.observe(out)
                finals[i] = out
    except asyncio.CancelledError:
        state.observe_aborted()
        raise
    for i in range(len(streams)):
        yield finals[i]


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer the stream


def _sse(obj) -> str:
    return f"data: {dumps(obj)}\n\n"


async def _sse_response(state: ServerState, streams, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events of a streaming endpoint: its chunks, then [DONE]. An engine error mid-stream becomes an
    error event (then [DONE]); a client that leaves early counts as aborted. The streams are closed either way."""
    finished = False
    try:
        async for chunk in chunks:
            yield _sse(chunk)
        finished = True
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - engine error mid-stream: tell the client, then end the stream
        finished = True
        yield _sse(error_for(exc).openai_body())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            state.observe_aborted()
        for s in streams:
            s.close()


async def _completion_chunks(state: ServerState, streams, rid, created, model, n, echo, include_usage, logprobs):
    tracker = DeltaTracker()
    n_prompt: dict[int, int] = {}
    n_out = 0
    base = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    if any(echo):
        for i, e in enumerate(echo):
            for j in range(n):
                yield {**base, "choices": [{"index": i * n + j, "text": e, "logprobs": None,
                                            "finish_reason": None}]}
    async for i, out in merge_streams(streams):
        n_prompt[i] = len(out.prompt_token_ids)
        for o in out.outputs:
            key = i * n + o.index
            if key in tracker.done:
                continue
            text, t0, t1 = tracker.delta(key, o)
            if not text and not o.finished and (logprobs is None or t0 == t1):
                continue
            lp = (_completion_logprobs(state, o, t0, t1, tracker.text[key] - len(text) + len(echo[i]))
                  if logprobs is not None else None)
            choice = {"index": key, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
            if o.finished:
                tracker.done.add(key)
                n_out += len(o.token_ids)
                choice["stop_reason"] = o.stop_reason
            yield {**base, "choices": [choice]}
        if out.finished:
            state.observe(out)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(sum(n_prompt.values()), n_out)}


# ---- /v1/chat/completions ------------------------------------------------------------------------------------
def _messages(msgs: list[ChatMessage]) -> list[dict]:
    out = []
    for k, m in enumerate(msgs):
        d = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{k}]: content parts of type '{part.type}' are not supported "
                                        "(text only)", param="messages")
                texts.append(part.text)
            d["content"] = "\n".join(texts)
        if d.get("role") == "developer":  # OpenAI's newer name for the system role; templates know "system"
            d["role"] = "system"
        out.append(d)
    return out


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**_stream_doc("The chat completion"), **ERROR_RESPONSES})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Chat: the messages are rendered with the model's chat template, then completed."""
    state = get_state(request)
    model = state.check_model(body.model)
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format '{body.response_format.type}' is not supported (only 'text')",
                       param="response_format")
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice must be 'none' or 'auto' (tool calls are not parsed)", param="tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {body.top_logprobs}", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top_n = body.top_logprobs or 0
    params = _sampling_params(body, max_tokens, top_n if body.logprobs else None)
    prompt_ids = state.chat_prompt_ids(_messages(body.messages), tools=body.tools,
                                       add_generation_prompt=body.add_generation_prompt,
                                       continue_final_message=body.continue_final_message,
                                       template_kwargs=body.chat_template_kwargs)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await state.submit_all([prompt_ids], params, rid)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _sse_response(state, streams, _chat_chunks(state, streams, rid, created, model, params.n,
                                                        include_usage, top_n if body.logprobs else None))
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=close_all(streams))

    async def run():
        return [out async for out in _finals(state, streams)]

    (out,) = await until_disconnected(request, run())
    choices, n_out = [], 0
    for o in out.outputs:
        n_out += len(o.token_ids)
        lp = {"content": _chat_logprobs(state, o, 0, len(o.token_ids), top_n), "refusal": None} if body.logprobs else None
        choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text},
                        "logprobs": lp, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(len(out.prompt_token_ids), n_out),
                         "system_fingerprint": None})


async def _chat_chunks(state: ServerState, streams, rid, created, model, n, include_usage, top_n):
    tracker = DeltaTracker()
    n_prompt = n_out = 0
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    for j in range(n):
        yield {**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
    async for _, out in merge_streams(streams):
        n_prompt = len(out.prompt_token_ids)
        for o in out.outputs:
            if o.index in tracker.done:
                continue
            text, t0, t1 = tracker.delta(o.index, o)
            if not text and not o.finished and (top_n is None or t0 == t1):
                continue
            lp = {"content": _chat_logprobs(state, o, t0, t1, top_n)} if top_n is not None else None
            choice = {"index": o.index, "delta": {"content": text} if text else {}, "logprobs": lp,
                      "finish_reason": o.finish_reason}
            if o.finished:
                tracker.done.add(o.index)
                n_out += len(o.token_ids)
                choice["stop_reason"] = o.stop_reason
            yield {**base, "choices": [choice]}
        if out.finished:
            state.observe(out)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(n_prompt, n_out)}


# ---- /v1/embeddings ------------------------------------------------------------------------------------------
async def embed_inputs(state: ServerState, inputs: list[str | list[int]], param: str = "input"
                       ) -> tuple[list[list[float]], int]:
    ids: list[list[int]] = []
    for k, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"{param}[{k}] is empty", param=param)
            ids.append(state.require_tokenizer().encode(item))
        else:
            ids.append([int(t) for t in item])
    try:
        vectors = await state.engine.embed(ids)
    except Exception as exc:  # noqa: BLE001
        err = error_for(exc)
        err.param = err.param or param
        raise err from None
    return vectors, sum(len(x) for x in ids)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    """Embeddings: the mean over the input tokens of the model's final-norm hidden states (the LM head's
    input), L2-normalised (unit length, so a dot product is the cosine similarity)."""
    state = get_state(request)
    model = state.check_model(body.model)
    hidden = state.engine.model_config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions must be the model's hidden size {hidden}", param="dimensions")
    inputs = [body.input] if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)) \
        else list(body.input)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    vectors, n_tokens = await embed_inputs(state, inputs)
    data = []
    for i, vec in enumerate(vectors):
        emb: list[float] | str = vec
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": _usage(n_tokens, 0)})
