"""`tokenloom serve`: one FastAPI app over one AsyncEngine, speaking the OpenAI and Ollama APIs.

    GET  /health                 200 while the engine runs (never needs the API key)
    GET  /metrics                Prometheus text format (this server's own registry)
    GET  /v1/models, /v1/models/{model}
    POST /v1/completions, /v1/chat/completions, /v1/embeddings        (SSE streaming, `data: [DONE]`)
    POST /api/generate, /api/chat, /api/embed, /api/show              (NDJSON streaming)
    GET  /api/tags, /api/ps, /api/version
    GET  /openapi.json, /docs

Errors: OpenAI-style {"error": {"message", "type", "param", "code"}} bodies everywhere but under /api/, where
they are Ollama's {"error": "..."}; request validation failures are 400 (not FastAPI's 422).

Layout: openai/ and ollama/ hold each API's schemas (protocol.py) and routes; both share the app's ServerState
and APIError (server_state.py) and the stream plumbing: SSE / NDJSON framing, client disconnects
(streaming.py). This module builds the app: the routers, the API-key and metrics middleware, error bodies,
/health, /metrics.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenloom.version import __version__
from tokenloom.config import TokenloomError
from tokenloom.engine.async_engine import AsyncEngine
from tokenloom.entrypoints import ollama, openai
from tokenloom.entrypoints.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from tokenloom.entrypoints.server_state import APIError, ServerState, error_for

log = logging.getLogger("tokenloom.server")

GRACEFUL_SHUTDOWN_S = 30  # SIGTERM: in-flight requests get this long to finish
_OPEN_PATHS = frozenset({"/health"})


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, err: APIError) -> JSONResponse:
    body = {"error": err.message} if _is_ollama(path) else err.openai_body()
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


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
    """Pure ASGI middleware (streaming- and disconnect-safe): API key check, then HTTP request metrics."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

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

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path not in _OPEN_PATHS and not self._authorized(scope):
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key")
                await error_response(path, err)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_http(self._route(scope), status[0])


def build_app(async_engine: AsyncEngine, served_model_name: str | None = None, api_key: str | None = None,
              max_queue: int | None = None) -> FastAPI:
    """The HTTP app over a (started or not yet started) AsyncEngine. The engine's lifecycle belongs to the
    caller; the app only starts it if needed. max_queue bounds waiting requests (503 past it)."""
    name = served_model_name or async_engine.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield

    app = FastAPI(
        title="tokenloom", version=__version__, lifespan=lifespan,
        description="OpenAI- and Ollama-compatible inference server. OpenAI endpoints answer errors as "
                    "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, Ollama endpoints (/api/*) as "
                    "`{\"error\": \"...\"}`; invalid requests are 400." +
                    (" Every endpoint but /health needs `Authorization: Bearer <key>`." if api_key else ""),
    )
    metrics = ServerMetrics(async_engine, name)
    app.state.tokenloom = ServerState(async_engine, name, max_queue, metrics)
    app.include_router(openai.router)
    app.include_router(ollama.router)

    @app.get("/health", tags=["Server"], responses={503: {"description": "The engine is not running"}})
    async def health():
        """Liveness: 200 while the engine thread runs. Never needs the API key."""
        if async_engine.is_running:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics", tags=["Server"], response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics():
        """Prometheus metrics: requests by status, TTFT / TPOT / end-to-end latency histograms, token counters,
        running / waiting sequences, KV-cache usage, prefix-cache hit rate, sequences per engine step."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", tags=["Server"], response_class=PlainTextResponse)
    async def root():
        """'tokenloom is running' (as Ollama answers on /)."""
        return PlainTextResponse("tokenloom is running")

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
        return error_response(request.url.path, APIError(exc.status_code, msg, type=kind))

    @app.exception_handler(TokenloomError)
    async def on_engine_error(request: Request, exc: TokenloomError):
        return error_response(request.url.path, error_for(exc))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, APIError(500, f"internal error: {exc}", type="server_error"))

    _truthful_openapi(app, bool(api_key))
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
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
