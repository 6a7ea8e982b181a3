"""`tokenloom serve`: load the model, start the engine thread and the HTTP server."""
from __future__ import annotations

import asyncio
import signal
import sys
import threading

from tokenloom.config import TokenloomError
from tokenloom.engine.async_engine import AsyncEngine
from tokenloom.entrypoints.engine_args import make_llm
from tokenloom.entrypoints.server import build_app


def serve(args) -> None:
    """Load the model, start the engine thread and uvicorn; SIGTERM / Ctrl-C stop accepting connections, let
    in-flight requests finish (at most --shutdown-timeout seconds, then they end with an error event), then
    exit."""
    import uvicorn

    llm = make_llm(args)
    aengine = AsyncEngine(llm.engine).start()
    name = args.served_model_name or llm.engine.model_name
    app = build_app(aengine, name, api_key=args.api_key, max_queue=args.max_queue,
                    max_request_bytes=args.max_request_bytes)
    drain_s = args.shutdown_timeout
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=drain_s + 2)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = host if ":" not in host else f"[{host}]"
                url = f"http://{shown}:{port}"
                auth = "  (API key required)" if args.api_key else ""
                print(f"tokenloom: serving '{name}' at {url}  -  OpenAI API: {url}/v1  Ollama API: {url}/api  "
                      f"metrics: {url}/metrics{auth}", flush=True)

        async def shutdown(self, sockets=None):
            # Streams still running at the drain deadline end as streams do on an engine error (an error event,
            # then [DONE]; an {"error"} line under /api/), not cut mid-chunk by uvicorn's cancellation.
            loop = asyncio.get_running_loop()
            deadline = loop.call_later(drain_s, aengine.abort_all,
                                       f"the server is shutting down: requests still running after {drain_s:g} s "
                                       "were stopped")
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    server = Server(config)
    # uvicorn handles SIGTERM gracefully, then re-raises it once done: answer that with a clean exit.
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise TokenloomError(f"could not start the server on {args.host}:{args.port}") from None
    finally:
        aengine.shutdown()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    print("tokenloom: server stopped", file=sys.stderr, flush=True)
