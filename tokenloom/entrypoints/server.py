"""`tokenloom serve`: one FastAPI app over one AsyncEngine, speaking the OpenAI and Ollama APIs.

    GET  /health                 200 while the engine runs (never needs the API key)
    GET  /metrics                Prometheus text format (this server's own registry)
    GET  /v1/models, /v1/models/{model}
    POST /v1/completions, /v1/chat/completions, /v1/embeddings        (SSE streaming, `data: [DONE]`)
    POST /api/generate, /api/chat, /api/embed, /api/show              (NDJSON streaming)
    GET  /api/tags, /api/ps, /api/version
    GET  /openapi.json, /docs
    GET  /                       the web chat page for browsers (Accept: text/html), else 'tokenloom is running'
    GET  /ui/...                 the page's script and style sheet (entrypoints/web/; no API key needed)

Errors: OpenAI-style {"error": {"message", "type", "param", "code"}} bodies everywhere but under /api/, where
they are Ollama's {"error": "..."}; request validation failures are 400 (not FastAPI's 422).

Layout: openai/ and ollama/ hold each API's schemas (protocol.py) and routes; both share the app's ServerState
and APIError (server_state.py) and the stream plumbing: SSE / NDJSON framing, client disconnects
(streaming.py). This module builds the app: the routers, the API-key and metrics middleware, error bodies,
/health, /metrics, and serves the web chat.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenloom.version import __version__
from tokenloom.config import TokenloomError
from tokenloom.engine.async_engine import AsyncEngine
from tokenloom.entrypoints import admin, ollama, openai
from tokenloom.entrypoints.app_state import LEASES, SERVED_MODEL, ServerState
from tokenloom.entrypoints.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from tokenloom.entrypoints.model_pool import ModelPool, PoolConfig
from tokenloom.entrypoints.routing import Router
from tokenloom.entrypoints.server_state import APIError, error_for

log = logging.getLogger("tokenloom.server")

MAX_REQUEST_BYTES = 32 << 20  # request bodies beyond this are refused with 413 (--max-request-bytes)
_OPEN_PATHS = frozenset({"/health", "/"})
# The web chat: its page and assets load without the API key (the page asks for the key; /v1 still needs it).
WEB_DIR = Path(__file__).with_name("web")
_WEB_PREFIX = "/ui/"
_PAGE_HEADERS = {
    "Vary": "Accept",  # / answers browsers and API probes differently: caches must keep both apart
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
}


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, err: APIError, headers: dict | None = None) -> JSONResponse:
    body = {"error": err.message} if _is_ollama(path) else err.openai_body()
    headers = dict(headers or {})
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if err.status == 503:  # busy or starting: clients with a retry policy come back
        headers.setdefault("Retry-After", "1")
    return JSONResponse(body, status_code=err.status, headers=headers or None)



def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return f"malformed JSON in the request body{': ' + detail if detail else ''}", None
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        if e.get("type") == "missing" and not loc:
            parts.append("the request body is missing (send a JSON object)")
        elif not loc:
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param


class _Gate:
    """Pure ASGI middleware (streaming- and disconnect-safe): API key check, the request-body limit (413), JSON
    bodies taken whatever their Content-Type (as Ollama and vLLM do: `curl -d` sends form encoding), then HTTP
    request metrics; the leases a request took on its model end here, once its response is sent."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.max_request_bytes = max_request_bytes

    @staticmethod
    def _route(scope) -> str:
        """The matched route's template (bounded label values); 'other' for unrouted requests."""
        route = scope.get("route")
        return getattr(route, "path", None) or "other"

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                v = value.decode("latin-1")
                scheme, _, token = v.partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]
        leases: list = []
        scope = {**scope, LEASES: leases}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            is_open = path in _OPEN_PATHS or path.startswith(_WEB_PREFIX)
            if self.api_key and not is_open and not self._authorized(scope):
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key")
                await error_response(path, err)(scope, receive, send_status)
                return
            if self._content_length(scope) > self.max_request_bytes:
                err = APIError(413, self._too_large_message(), code="request_too_large")
                await error_response(path, err)(scope, receive, send_status)
                return
            if scope["method"] in ("POST", "DELETE"):
                scope = self._as_json(scope)
            await self.app(scope, self._counting(receive), send_status)
        finally:
            self.metrics.observe_http(self._route(scope), status[0])
            if status[0] >= 400 and scope.get(SERVED_MODEL):
                self.metrics.observe_error(scope[SERVED_MODEL], status[0])
            for model in leases:
                model.release()

    @staticmethod
    def _content_length(scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    @staticmethod
    def _as_json(scope):
        """The scope with Content-Type application/json unless it already names JSON."""
        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
        given = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), b"")
        if b"json" in given.lower():
            return scope
        return {**scope, "headers": headers + [(b"content-type", b"application/json")]}

    def _too_large_message(self) -> str:
        return f"the request body is larger than {self.max_request_bytes} bytes (--max-request-bytes)"

    def _counting(self, receive):
        """receive(), answering 413 once a body without Content-Length (chunked) grows past the limit while it
        is read (FastAPI passes an HTTPException raised while reading the body on as it is)."""
        seen = [0]

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_request_bytes:
                    raise StarletteHTTPException(413, self._too_large_message())
            return message

        return wrapped


def build_app(async_engine: AsyncEngine | None = None, served_model_name: str | None = None,
              api_key: str | None = None, max_queue: int | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
              pool: ModelPool | None = None, router: Router | None = None) -> FastAPI:
    """The HTTP app over one (started or not yet started) AsyncEngine, or over a ModelPool that loads models on
    demand (async_engine None). A given engine's lifecycle belongs to the caller; the app only starts it if
    needed. max_queue bounds the requests waiting beyond a model's free sequence slots (503 past it); bodies over
    max_request_bytes get 413; router: the A/B routes."""
    metrics = (pool.metrics if pool is not None else None) or ServerMetrics()
    if pool is None:
        pool = ModelPool(PoolConfig(), metrics=metrics, max_queue=max_queue)
    pool.metrics, pool.max_queue = metrics, max_queue
    name = None
    if async_engine is not None:
        name = served_model_name or async_engine.model_name
        pool.add_loaded(async_engine, name, pinned=True)
    state = ServerState(pool, metrics, router, primary=name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if async_engine is not None:
            async_engine.start()
        pool.start()
        yield
        await pool.close()

    app = FastAPI(
        title="tokenloom", version=__version__, lifespan=lifespan,
        description="OpenAI- and Ollama-compatible inference server. OpenAI endpoints answer errors as "
                    "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, Ollama endpoints (/api/*) as "
                    "`{\"error\": \"...\"}`; invalid requests are 400." +
                    (" Every endpoint but /health and / (and the web chat's /ui/ files) needs `Authorization: Bearer "
                     "<key>`." if api_key else ""),
    )
    app.state.tokenloom = state
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(admin.router)

    @app.get("/health", tags=["Server"], responses={503: {"description": "The engine is not running"}})
    async def health():
        """Liveness: 200 while the engine threads of the loaded models run. Never needs the API key."""
        if all(m.engine.is_running for m in pool.loaded.values()):
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics", tags=["Server"], response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics():
        """Prometheus metrics: requests by status, TTFT / TPOT / end-to-end latency histograms, token counters,
        running / waiting sequences, KV-cache usage, prefix-cache hit rate, sequences per engine step."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.head("/", include_in_schema=False)  # probes; one documented operation (GET) per path and method
    @app.get("/", tags=["Server"], response_class=PlainTextResponse, responses={200: {
        "content": {"text/html": {}}, "description": "The web chat page (to browsers) or 'tokenloom is running' "
                                                     "(as Ollama answers on /, for probes)"}})
    async def root(request: Request):
        """The web chat page when the client accepts text/html (a browser), else 'tokenloom is running'."""
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)
        return PlainTextResponse("tokenloom is running", headers={"Vary": "Accept"})

    app.mount(_WEB_PREFIX.rstrip("/"), StaticFiles(directory=WEB_DIR), name="ui")  # mounts stay out of OpenAPI

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(request.url.path, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"{request.method} {request.url.path}: not found"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(request.url.path, APIError(exc.status_code, msg, type=kind), exc.headers)

    @app.exception_handler(TokenloomError)
    async def on_engine_error(request: Request, exc: TokenloomError):
        return error_response(request.url.path, error_for(exc))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, APIError(500, f"internal error: {exc}", type="server_error"))

    _truthful_openapi(app, bool(api_key))
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics, max_request_bytes=max_request_bytes)
    return app


def _truthful_openapi(app: FastAPI, secured: bool) -> None:
    """Drop FastAPI's 422 responses (validation errors are answered 400) and declare the bearer key."""
    default = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = default()
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                if not isinstance(op, dict):
                    continue
                op.get("responses", {}).pop("422", None)
                if secured and path not in _OPEN_PATHS:
                    op["security"] = [{"bearer": []}]
        comps = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            comps.get("schemas", {}).pop(unused, None)
        if secured:
            comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
