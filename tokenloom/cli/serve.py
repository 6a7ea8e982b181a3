"""`tokenloom serve [MODEL]`: load the model (or prepare to load any on demand), start the HTTP server."""
from __future__ import annotations

import asyncio
import signal
import sys
import threading

from tokenloom.config import TokenloomError


def _one_model_app(args):
    """`serve MODEL`: the model loaded now and kept."""
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.entrypoints.server import build_app

    from tokenloom.entrypoints.scale_out import make_worker_engine, wants_workers

    if wants_workers(args):  # engines in worker processes: data-parallel replicas or prefill/decode workers
        if args.lora_modules:
            raise TokenloomError("--lora-modules needs the engine in the server process (no --data-parallel-size, "
                                 "--prefill-workers)")
        aengine, adapters = make_worker_engine(args), {}
    else:
        llm = make_llm(args)
        adapters = _lora_modules(args, llm)
        aengine = AsyncEngine(llm.engine).start()
    name = args.served_model_name or aengine.model_name
    app = build_app(aengine, name, api_key=args.api_key, max_queue=args.max_queue,
                    max_request_bytes=args.max_request_bytes, router=_router(args))
    app.state.tokenloom.primary_model().adapters.update(adapters)
    return app, f"'{name}'"


def _lora_modules(args, llm) -> dict:
    """--lora-modules NAME=PATH ...: each adapter read, checked and added before the server starts."""
    from tokenloom.lora import LoRARequest

    if args.lora_modules and not args.enable_lora:
        raise TokenloomError("--lora-modules needs --enable-lora")
    adapters = {}
    for i, spec in enumerate(args.lora_modules, start=1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise TokenloomError(f"--lora-modules takes NAME=PATH, got {spec!r}")
        adapters[name] = LoRARequest(name, i, path)
        llm.engine.add_lora(adapters[name])
    return adapters


def _many_models_app(args):
    """`serve`: every model the server can resolve, loaded on demand with the command's engine settings."""
    import dataclasses

    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.engine_args import EngineArgs
    from tokenloom.entrypoints.model_pool import ModelPool, ModelSources, PoolConfig
    from tokenloom.entrypoints.server import build_app
    from tokenloom.loader.sources import DEFAULT_MODEL, list_models, pull
    from tokenloom.loader.variants import estimate_weight_bytes

    if args.lora_modules:
        raise TokenloomError("--lora-modules needs a MODEL (`tokenloom serve MODEL --enable-lora ...`); serving many "
                             "models, add adapters with POST /v1/load_lora_adapter")
    base_args = EngineArgs.from_namespace(args)
    sources = ModelSources(list(args.models), list(args.models_dirs))
    if not args.models and not args.models_dirs and not list_models():
        pull(DEFAULT_MODEL)  # a fresh machine: the default model, so there is one to serve
    sources.known()  # a bad --model fails here, at start

    def load(variant, source):
        engine_args = dataclasses.replace(base_args, model=source, **variant.overrides)
        return AsyncEngine(engine_args.create_llm().engine).start()

    config = PoolConfig(keep_alive_s=args.keep_alive, max_loaded_models=args.max_loaded_models,
                        memory_budget_bytes=args.memory_budget)
    pool = ModelPool(config, factory=load, estimate=estimate_weight_bytes, sources=sources)
    app = build_app(None, api_key=args.api_key, max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                    pool=pool, router=_router(args))
    names = ", ".join(sources.known()) or "none yet"
    return app, f"models on demand ({names})"


def _router(args):
    from tokenloom.entrypoints.routing import Router

    return Router(args.routes) if args.routes else None


def serve(args) -> None:
    """Start the engine(s) and uvicorn; SIGTERM / Ctrl-C stop accepting connections, let in-flight requests
    finish (at most --shutdown-timeout seconds, then they end with an error event), then exit. SIGHUP reads the
    --routes file again."""
    import uvicorn

    if not args.model and (getattr(args, "data_parallel_size", 1) > 1 or getattr(args, "prefill_workers", 0)):
        raise TokenloomError("--data-parallel-size / --prefill-workers need a MODEL (`tokenloom serve MODEL ...`)")
    app, what = _one_model_app(args) if args.model else _many_models_app(args)
    state = app.state.tokenloom
    drain_s = args.shutdown_timeout
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=drain_s + 2)

    def reload_routes():
        try:
            routes = state.reload_routes()
            print(f"tokenloom: routes reloaded: {routes}", file=sys.stderr, flush=True)
        except TokenloomError as exc:
            print(f"tokenloom: routes not reloaded (the routes in force stay): {exc}", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = host if ":" not in host else f"[{host}]"
                url = f"http://{shown}:{port}"
                auth = "  (API key required)" if args.api_key else ""
                print(f"tokenloom: serving {what} at {url}  -  OpenAI API: {url}/v1  Ollama API: {url}/api  "
                      f"metrics: {url}/metrics{auth}", flush=True)
                if args.routes and threading.current_thread() is threading.main_thread():
                    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_routes)

        async def shutdown(self, sockets=None):
            # Streams still running at the drain deadline end as streams do on an engine error (an error event,
            # then [DONE]; an {"error"} line under /api/), not cut mid-chunk by uvicorn's cancellation.
            loop = asyncio.get_running_loop()
            message = f"the server is shutting down: requests still running after {drain_s:g} s were stopped"
            deadline = loop.call_later(drain_s, lambda: [m.engine.abort_all(message)
                                                         for m in list(state.pool.loaded.values())])
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
        for m in list(state.pool.loaded.values()):
            m.engine.shutdown()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    print("tokenloom: server stopped", file=sys.stderr, flush=True)
