"""Ollama-compatible API: /api/generate, /api/chat (newline-delimited JSON streaming, stream defaults to true),
/api/embed, /api/tags, /api/show, /api/ps, /api/version. Errors are {"error": "..."} bodies.

`options` map onto sampling: temperature, top_k, top_p, min_p, num_predict (-1 / -2 = up to the context
window), stop, seed, repeat_penalty, presence_penalty, frequency_penalty; other Ollama options (num_ctx,
num_thread, mirostat, ...) are accepted and ignored. Defaults follow Ollama: temperature 0.8, top_k 40,
top_p 0.9. Durations are in nanoseconds.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenloom.version import __version__
from tokenloom.engine.llm_engine import RequestOutput
from tokenloom.entrypoints.openai_api import (
    APIError,
    DeltaTracker,
    ServerState,
    _chat_logprobs,
    close_all,
    documented_errors,
    dumps,
    embed_inputs,
    error_for,
    get_state,
    merge_streams,
    until_disconnected,
)
from tokenloom.sampling_params import SamplingParams, SamplingParamsError

OLLAMA_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9)


# ---- schemas -------------------------------------------------------------------------------------------------
class OllamaError(BaseModel):
    error: str


ERRORS = documented_errors(OllamaError, "invalid options", "num_predict")


class Options(BaseModel):
    """Model options; unknown ones are accepted and ignored, as Ollama does for options it cannot apply."""
    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, description="0 = greedy (default 0.8)")
    top_k: int | None = Field(None, description="default 40; 0 = off")
    top_p: float | None = Field(None, description="default 0.9")
    min_p: float | None = None
    num_predict: int | None = Field(None, description="Tokens to generate; -1 (default) or -2 = up to the context")
    stop: list[str] | str | None = None
    seed: int | None = None
    repeat_penalty: float | None = Field(None, description="Repetition penalty (1 = off, the default)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(None, description="Ignored: the context window is the server's")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., description="The served model's name (GET /api/tags), ':latest' optional")
    options: Options | None = None
    stream: bool = Field(True, description="Stream newline-delimited JSON objects (default true)")
    format: str | dict | None = Field(None, description="Not supported (must be empty)")
    keep_alive: float | str | None = Field(None, description="Ignored (the model stays loaded)")
    think: bool | str | None = Field(None, description="Ignored")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="With logprobs: the top-N alternatives per token (0..20)")


class GenerateRequest(_Common):
    prompt: str | None = Field(None, description="Empty or missing: just report the model loaded")
    suffix: str | None = Field(None, description="Not supported")
    system: str | None = Field(None, description="System message for the chat template")
    template: str | None = Field(None, description="Ignored (Go templates): the model's chat template is used")
    context: list[int] | None = Field(None, description="Token ids from a previous response, prepended")
    raw: bool = Field(False, description="Send the prompt as is, without the chat template")
    images: list[str] | None = Field(None, description="Not supported")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None
    images: list[str] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict] | None = Field(None, description="Passed to the chat template; tool calls are not parsed")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str]
    truncate: bool = Field(True, description="Cut inputs to the context window (false: error instead)")
    options: Options | None = None
    keep_alive: float | str | None = None
    dimensions: int | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = Field(None, description="Deprecated alias of model")
    verbose: bool = False


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class _Stats(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateResponse(_Stats):
    response: str
    context: list[int] | None = None
    logprobs: list[dict] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatResponse(_Stats):
    message: AssistantMessage
    logprobs: list[dict] | None = None


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class TagModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[TagModel]


class PsModel(TagModel):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    models: list[PsModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


def _ndjson_doc(what: str) -> dict:
    return {200: {"description": f"{what}; with stream=true (the default), newline-delimited JSON objects, the "
                                 "last with done=true and the timings",
                  "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}


router = APIRouter(tags=["Ollama"])


# ---- helpers -------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


def _params(opts: Options | None, logprobs: bool, top_logprobs: int | None) -> SamplingParams:
    o = opts or Options()
    num_predict = o.num_predict
    if num_predict is not None and num_predict not in (-1, -2) and num_predict < 1:
        raise APIError(400, f"num_predict must be a positive number of tokens, or -1 / -2, got {num_predict}",
                       param="num_predict")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {top_logprobs}", param="top_logprobs")
    try:
        return SamplingParams(
            temperature=OLLAMA_DEFAULTS["temperature"] if o.temperature is None else o.temperature,
            top_k=OLLAMA_DEFAULTS["top_k"] if o.top_k is None else o.top_k,
            top_p=OLLAMA_DEFAULTS["top_p"] if o.top_p is None else o.top_p,
            min_p=o.min_p or 0.0,
            max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
            stop=o.stop, seed=o.seed,
            repetition_penalty=1.0 if o.repeat_penalty is None else o.repeat_penalty,
            presence_penalty=o.presence_penalty or 0.0, frequency_penalty=o.frequency_penalty or 0.0,
            logprobs=(top_logprobs or 0) if logprobs else None,
        )
    except SamplingParamsError as exc:
        param = {"repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"}.get(exc.param, exc.param)
        raise APIError(400, str(exc).replace(exc.param, param, 1), param=param) from None


def _check_common(body: _Common) -> None:
    if body.format not in (None, "", {}):
        raise APIError(400, "format (structured output) is not supported", param="format")


def _stats(start: float, out: RequestOutput) -> dict:
    m = out.metrics
    o = out.outputs[0]
    end = m.finished_time or time.perf_counter()
    first = m.first_token_time or end
    return {"done_reason": o.finish_reason or "stop", "total_duration": _ns(time.perf_counter() - start),
            "load_duration": _ns(m.arrival_time - start), "prompt_eval_count": len(out.prompt_token_ids),
            "prompt_eval_duration": _ns(first - m.arrival_time), "eval_count": len(o.token_ids),
            "eval_duration": _ns(end - first)}


async def _ndjson(state: ServerState, streams, start: float, model: str, kind: str, top_n: int | None):
    """Ollama stream: one JSON object per line; the last has done=true and the timings."""
    tracker = DeltaTracker()
    finished = False
    try:
        async for _, out in merge_streams(streams):
            o = out.outputs[0]
            text, t0, t1 = tracker.delta(0, o)
            if text or (top_n is not None and t1 > t0):
                chunk: dict[str, Any] = {"model": model, "created_at": _now()}
                if kind == "chat":
                    chunk["message"] = {"role": "assistant", "content": text}
                else:
                    chunk["response"] = text
                chunk["done"] = False
                if top_n is not None:
                    chunk["logprobs"] = _chat_logprobs(state, o, t0, t1, top_n)
                    tracker.tokens[0] = t1
                yield dumps(chunk) + "\n"
            elif top_n is not None:
                tracker.tokens[0] = t0  # keep unsent logprobs for the next chunk
            if out.finished:
                state.observe(out)
                last: dict[str, Any] = {"model": model, "created_at": _now()}
                if kind == "chat":
                    last["message"] = {"role": "assistant", "content": ""}
                else:
                    last["response"] = ""
                last["done"] = True
                last.update(_stats(start, out))
                if kind == "generate":
                    last["context"] = out.prompt_token_ids + o.token_ids
                finished = True
                yield dumps(last) + "\n"
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


async def _run(state: ServerState, request: Request, body: _Common, prompt, start: float, model: str, kind: str):
    params = _params(body.options, body.logprobs, body.top_logprobs)
    streams = await state.submit_all([prompt], params, f"ollama-{kind}-{uuid.uuid4().hex}")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    if body.stream:
        return StreamingResponse(_ndjson(state, streams, start, model, kind, top_n),
                                 media_type="application/x-ndjson", background=close_all(streams))

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
    resp: dict[str, Any] = {"model": model, "created_at": _now()}
    if kind == "chat":
        resp["message"] = {"role": "assistant", "content": o.text}
    else:
        resp["response"] = o.text
    resp["done"] = True
    resp.update(_stats(start, out))
    if kind == "generate":
        resp["context"] = out.prompt_token_ids + o.token_ids
    if top_n is not None:
        resp["logprobs"] = _chat_logprobs(state, o, 0, len(o.token_ids), top_n)
    return JSONResponse(resp)


def _loaded(model: str, kind: str, keep_alive) -> JSONResponse:
    """Ollama's answer to an empty prompt: load (or with keep_alive 0, unload) the model."""
    resp: dict[str, Any] = {"model": model, "created_at": _now()}
    if kind == "chat":
        resp["message"] = {"role": "assistant", "content": ""}
    else:
        resp["response"] = ""
    resp.update(done=True, done_reason="unload" if keep_alive in (0, "0", "0s", "0m") else "load")
    return JSONResponse(resp)


# ---- generation ----------------------------------------------------------------------------------------------
@router.post("/api/generate", response_model=GenerateResponse, responses={**_ndjson_doc("The response"), **ERRORS})
async def generate(body: GenerateRequest, request: Request):
    """Complete a prompt (rendered as a user message with the chat template unless raw is true)."""
    start = time.perf_counter()
    state = get_state(request)
    model = state.check_model(body.model, ollama=True)
    _check_common(body)
    if body.images:
        raise APIError(400, "images are not supported by this model", param="images")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if not body.prompt:
        return _loaded(model, "generate", body.keep_alive)
    tok = state.require_tokenizer()
    if body.raw or tok.chat_template is None:
        ids = tok.encode(body.prompt)
    else:
        msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": body.prompt}]
        ids = state.chat_prompt_ids(msgs)
    if body.context:
        ids = list(body.context) + ids
    return await _run(state, request, body, ids, start, model, "generate")


@router.post("/api/chat", response_model=ChatResponse, responses={**_ndjson_doc("The reply"), **ERRORS})
async def chat(body: ChatRequest, request: Request):
    """Chat: the messages are rendered with the model's chat template, then completed."""
    start = time.perf_counter()
    state = get_state(request)
    model = state.check_model(body.model, ollama=True)
    _check_common(body)
    if not body.messages:
        return _loaded(model, "chat", body.keep_alive)
    msgs = []
    for k, m in enumerate(body.messages):
        if m.images:
            raise APIError(400, f"messages[{k}]: images are not supported by this model", param="messages")
        d = m.model_dump(exclude_none=True)
        d.pop("images", None)
        d.setdefault("content", "")
        msgs.append(d)
    ids = state.chat_prompt_ids(msgs, tools=body.tools)
    return await _run(state, request, body, ids, start, model, "chat")


@router.post("/api/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, request: Request):
    """Embeddings, pooled as /v1/embeddings: mean of the final-norm hidden states, L2-normalised."""
    start = time.perf_counter()
    state = get_state(request)
    model = state.check_model(body.model, ollama=True)
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
        t = tok.encode(text)
        if body.truncate:
            t = t[: state.engine.max_model_len]
        ids.append(t)
    vectors, n = await embed_inputs(state, ids)
    return JSONResponse({"model": model, "embeddings": vectors, "total_duration": _ns(time.perf_counter() - start),
                         "load_duration": 0, "prompt_eval_count": n})


# ---- model information ---------------------------------------------------------------------------------------
def _model_facts(state: ServerState) -> dict:
    """Computed once per server: details, size, digest, modification time, model_info."""
    if state._model_info is not None:
        return state._model_info
    eng = state.engine.engine
    src, cfg = eng.model_source, eng.model_config
    path = Path(src.path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    size = sum(f.stat().st_size for f in files if f.is_file())
    mtime = max((f.stat().st_mtime for f in files if f.is_file()), default=time.time())
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and f.stat().st_size <= (4 << 30):
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        else:
            h.update(f"{f.name}:{f.stat().st_size if f.exists() else 0}".encode())
    quant = "unknown"
    params = cfg.num_params
    try:
        from tokenloom.loader.inspect import describe_model

        info = describe_model(str(src.path))
        quant = info.get("quantization", quant).split(",")[0].split(" x")[0].strip().upper()
        p = info.get("parameters")
        if p:
            params = int(float(p[:-1]) * (1e9 if p.endswith("B") else 1e6))
    except Exception:  # noqa: BLE001 - details are best effort
        pass
    if eng.config.quantization:
        quant = eng.config.quantization.upper()
    quant = {"FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16"}.get(quant, quant)
    psize = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    arch = cfg.architecture
    details = {"parent_model": "", "format": "gguf" if src.kind == "gguf" else "safetensors", "family": arch,
               "families": [arch], "parameter_size": psize, "quantization_level": quant}
    model_info = {
        "general.architecture": arch, "general.parameter_count": params, "general.name": src.name,
        f"{arch}.context_length": state.engine.max_model_len, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_heads, f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.rope.freq_base": cfg.rope_theta,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, f"{arch}.vocab_size": cfg.vocab_size,
    }
    state._model_info = {
        "details": details, "size": size, "digest": h.hexdigest(), "path": str(src.path),
        "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z"),
        "model_info": model_info,
    }
    return state._model_info


async def _facts(state: ServerState) -> dict:
    if state._model_info is None:
        await asyncio.to_thread(_model_facts, state)
    return state._model_info


def _tag(state: ServerState, facts: dict) -> dict:
    return {"name": state.served_model_name, "model": state.served_model_name, "modified_at": facts["modified_at"],
            "size": facts["size"], "digest": facts["digest"], "details": facts["details"]}


@router.get("/api/tags", response_model=TagsResponse, responses={401: ERRORS[401]})
async def tags(request: Request):
    """Models available (the served model)."""
    state = get_state(request)
    return {"models": [_tag(state, await _facts(state))]}


@router.get("/api/ps", response_model=PsResponse, responses={401: ERRORS[401]})
async def ps(request: Request):
    """Models loaded in memory (the served model, for as long as the server runs)."""
    state = get_state(request)
    facts = await _facts(state)
    expires = (datetime.now(UTC) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    return {"models": [{**_tag(state, facts), "expires_at": expires, "size_vram": 0,
                        "context_length": state.engine.max_model_len}]}


@router.post("/api/show", response_model=ShowResponse, responses=ERRORS)
async def show(body: ShowRequest, request: Request):
    """Model details, chat template and architecture facts."""
    state = get_state(request)
    state.check_model(body.model or body.name, ollama=True)
    facts = await _facts(state)
    tok = state.tokenizer
    template = ""
    if tok is not None:
        try:
            template = tok.chat_template or ""
        except Exception:  # noqa: BLE001
            template = ""
        if isinstance(template, dict):
            template = template.get("default", "")
    return {"modelfile": f"# tokenloom: {state.served_model_name}\nFROM {facts['path']}\n",
            "parameters": "\n".join(f"{k} {v}" for k, v in OLLAMA_DEFAULTS.items()), "template": template,
            "details": facts["details"], "model_info": facts["model_info"],
            "capabilities": ["completion", "embedding"], "modified_at": facts["modified_at"]}


@router.get("/api/version", response_model=VersionResponse)
async def version(request: Request):
    """The server's version (tokenloom's)."""
    return {"version": __version__}
