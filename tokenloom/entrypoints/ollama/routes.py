"""/api/generate, /api/chat (newline-delimited JSON streaming, stream defaults to true), /api/embed and the
legacy /api/embeddings."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenloom.engine.outputs import RequestOutput
from tokenloom.entrypoints.ollama.protocol import (
    ERRORS,
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    Options,
    _Common,
    format_constraint,
    ndjson_doc,
    to_sampling_params,
)
from tokenloom.entrypoints.tool_calls import (
    ToolCallStreamParser,
    ToolError,
    from_ollama_messages,
    parse_tool_calls,
    prepare_messages,
    template_supports_tools,
    to_ollama_tool_calls,
    tool_constraint,
    validate_tools,
)
from tokenloom.entrypoints.app_state import get_state, parse_keep_alive
from tokenloom.entrypoints.created_models import ollama_options, with_messages
from tokenloom.entrypoints.server_state import APIError, ServedModel, chat_logprobs, embed_inputs
from tokenloom.entrypoints.streaming import DeltaTracker, merge_streams, ndjson_response, until_disconnected
from tokenloom.loader.created import CreatedModel

router = APIRouter(tags=["Ollama"])


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


def _stats(start: float, out: RequestOutput) -> dict:
    m = out.metrics
    o = out.outputs[0]
    end = m.finished_time or time.perf_counter()
    first = m.first_token_time or end
    return {"done_reason": o.finish_reason or "stop", "total_duration": _ns(time.perf_counter() - start),
            "load_duration": _ns(m.arrival_time - start), "prompt_eval_count": len(out.prompt_token_ids),
            "prompt_eval_duration": _ns(first - m.arrival_time), "eval_count": len(o.token_ids),
            "eval_duration": _ns(end - first)}


def _reply(model: str, kind: str, text: str) -> dict[str, Any]:
    """The start of every generate / chat answer: the model, the time and the text (a response or a message)."""
    resp: dict[str, Any] = {"model": model, "created_at": _now()}
    if kind == "chat":
        resp["message"] = {"role": "assistant", "content": text}
    else:
        resp["response"] = text
    return resp


def _done(model: str, kind: str, text: str, start: float, out: RequestOutput) -> dict[str, Any]:
    """The answer's last object: done=true, the timings and (for generate) the context token ids."""
    resp = _reply(model, kind, text)
    resp["done"] = True
    resp.update(_stats(start, out))
    if kind == "generate":
        resp["context"] = out.prompt_token_ids + out.outputs[0].token_ids
    return resp


async def _chunks(state: ServedModel, streams, start: float, model: str, kind: str, top_n: int | None,
                  tool_names: list[str] | None) -> AsyncIterator[dict]:
    """The streamed objects: text deltas (with their logprobs; with tools, the content and each tool call once
    complete), then the done=true object with the timings."""
    tracker = DeltaTracker()
    parser = ToolCallStreamParser(tool_names) if tool_names is not None else None
    async for _, out in merge_streams(streams):
        o = out.outputs[0]
        text, t0, t1 = tracker.delta(0, o)
        calls = []
        if parser is not None:
            text, calls = parser.feed(text)
            if o.finished:
                rest, more = parser.finish()
                text, calls = text + rest, calls + more
        if text or calls or (top_n is not None and t1 > t0):
            chunk = _reply(model, kind, text)
            chunk["done"] = False
            if calls:
                chunk["message"]["tool_calls"] = to_ollama_tool_calls(calls)
            if top_n is not None:
                chunk["logprobs"] = chat_logprobs(state, o, t0, t1, top_n)
                tracker.tokens[0] = t1
            yield chunk
        elif top_n is not None:
            tracker.tokens[0] = t0  # keep unsent logprobs for the next chunk
        if out.finished:
            state.observe(out)
            yield _done(model, kind, "", start, out)


async def _run(state: ServedModel, request: Request, body: _Common, prompt, start: float, model: str, kind: str,
               constraint=None, tool_names: list[str] | None = None):
    """Generate for an Ollama request; constraint: the output constraint (default: the body's format);
    tool_names: parse the reply for calls of these tools."""
    params = to_sampling_params(body.options, body.logprobs, body.top_logprobs,
                                constraint or format_constraint(body.format))
    await state.check_constraint(params, "tools" if constraint else "format")
    streams = await state.submit_all([prompt], params, f"ollama-{kind}-{uuid.uuid4().hex}")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    if body.stream:
        return ndjson_response(state, streams, _chunks(state, streams, start, model, kind, top_n, tool_names))

    async def collect():
        try:
            out = await streams[0].collect()
        except asyncio.CancelledError:
            state.observe_aborted()
            raise
        state.observe(out)
        return out

    out = await until_disconnected(request, collect())
    o = out.outputs[0]
    resp = _done(model, kind, o.text, start, out)
    if tool_names is not None:
        content, calls = parse_tool_calls(o.text, tool_names)
        if calls:
            resp["message"].update(content=content or "", tool_calls=to_ollama_tool_calls(calls))
    if top_n is not None:
        resp["logprobs"] = chat_logprobs(state, o, 0, len(o.token_ids), top_n)
    return JSONResponse(resp)


async def _model(request: Request, body: _Common) -> tuple[str, CreatedModel | None, ServedModel]:
    """(the name to answer with, the created model the request names or None, the loaded model), loading it if
    needed; a created model's PARAMETERs become the body's default options."""
    model, created, state = await get_state(request).resolve(request, body.model, ollama=True,
                                                             keep_alive=body.keep_alive)
    if created is not None and created.parameters:
        body.options = Options(**ollama_options(created, body.options))
    return model, created, state


def _loaded(model: str, kind: str, keep_alive, start: float) -> JSONResponse:
    """Ollama's answer to an empty prompt: load (or with keep_alive 0, unload) the model."""
    resp = _reply(model, kind, "")
    elapsed = _ns(time.perf_counter() - start)
    resp.update(done=True, done_reason="unload" if parse_keep_alive(keep_alive) == 0 else "load",
                total_duration=elapsed, load_duration=elapsed)
    return JSONResponse(resp)


@router.post("/api/generate", response_model=GenerateResponse, responses={**ndjson_doc("The response"), **ERRORS})
async def generate(body: GenerateRequest, request: Request):
    """Complete a prompt (rendered as a user message with the chat template unless raw is true)."""
    start = time.perf_counter()
    model, created, state = await _model(request, body)
    if body.images:
        raise APIError(400, "images are not supported by this model", param="images")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if not body.prompt:
        return _loaded(model, "generate", body.keep_alive, start)
    tok = state.require_tokenizer()
    if body.raw or tok.chat_template is None:
        ids = await state.encode(body.prompt)
    else:
        msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": body.prompt}]
        ids = await state.chat_prompt_ids(with_messages(created, msgs))
    if body.context:
        ids = list(body.context) + ids
    return await _run(state, request, body, ids, start, model, "generate")


@router.post("/api/chat", response_model=ChatResponse, responses={**ndjson_doc("The reply"), **ERRORS})
async def chat(body: ChatRequest, request: Request):
    """Chat: the messages are rendered with the model's chat template, then completed."""
    start = time.perf_counter()
    model, created, state = await _model(request, body)
    if not body.messages:
        return _loaded(model, "chat", body.keep_alive, start)
    msgs = []
    for k, m in enumerate(body.messages):
        if m.images:
            raise APIError(400, f"messages[{k}]: images are not supported by this model", param="messages")
        d = m.model_dump(exclude_none=True)
        d.pop("images", None)
        d.setdefault("content", "")
        msgs.append(d)
    try:  # Ollama has no tool_choice: the model may call a tool (checked by the grammar) or answer
        tools = validate_tools(body.tools)
        native = template_supports_tools(state.require_tokenizer().chat_template)
        msgs, template_tools = prepare_messages(from_ollama_messages(with_messages(created, msgs)), tools, native)
        constraint = tool_constraint(tools, "auto") if tools and format_constraint(body.format) is None else None
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    ids = await state.chat_prompt_ids(msgs, tools=template_tools)
    names = [t["function"]["name"] for t in tools] if constraint is not None else None
    return await _run(state, request, body, ids, start, model, "chat", constraint, names)


@router.post("/api/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, request: Request):
    """Embeddings, pooled as /v1/embeddings: mean of the final-norm hidden states, L2-normalised."""
    start = time.perf_counter()
    model, _, state = await get_state(request).resolve(request, body.model, ollama=True, keep_alive=body.keep_alive)
    t_loaded = time.perf_counter()
    hidden = state.engine.model_config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions must be the model's hidden size {hidden}", param="dimensions")
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    tok = state.require_tokenizer()
    ids = []
    for k, text in enumerate(inputs):
        if not text:
            raise APIError(400, f"input[{k}] is empty", param="input")
        # off the event loop; with truncate, a text longer than the context is cut after tokenizing
        t = await asyncio.to_thread(tok.encode, text) if body.truncate else await state.encode(text)
        if body.truncate:
            t = t[: state.engine.max_model_len]
        ids.append(t)
    vectors, n = await embed_inputs(state, ids)
    return JSONResponse({"model": model, "embeddings": vectors, "total_duration": _ns(time.perf_counter() - start),
                         "load_duration": _ns(t_loaded - start), "prompt_eval_count": n})


@router.post("/api/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
async def embeddings(body: EmbeddingsRequest, request: Request):
    """Legacy single-prompt embedding (the `ollama` client's embeddings()), pooled as /api/embed; never
    truncated: a prompt longer than the context window is a 400."""
    _, _, state = await get_state(request).resolve(request, body.model, ollama=True, keep_alive=body.keep_alive)
    if not body.prompt:  # Ollama answers an empty prompt with an empty embedding, not an error
        return JSONResponse({"embedding": []})
    try:
        vectors, _ = await embed_inputs(state, [body.prompt], param="prompt")
    except APIError as exc:
        if exc.code == "context_length_exceeded":  # the client may not know the two endpoints differ here
            exc.message += " (/api/embeddings never truncates; /api/embed truncates by default)"
        raise
    return JSONResponse({"embedding": vectors[0]})
