"""The Ollama-compatible API: /api/generate, /api/chat (newline-delimited JSON streaming, stream defaults to true),
/api/embed, /api/tags, /api/show, /api/ps, /api/version, and model management: /api/pull, /api/delete,
/api/copy, /api/create. Errors are {"error": "..."} bodies.

`options` map onto sampling: temperature, top_k, top_p, min_p, num_predict (-1 / -2 = up to the context
window), stop, seed, repeat_penalty, presence_penalty, frequency_penalty; other Ollama options (num_ctx,
num_thread, mirostat, ...) are accepted and ignored. Defaults follow Ollama: temperature 0.8, top_k 40,
top_p 0.9. Durations are in nanoseconds.

    protocol.py    request / response bodies, options -> SamplingParams, documented errors
    routes.py      /api/generate, /api/chat, /api/embed
    model_info.py  /api/tags, /api/ps, /api/show, /api/version
    manage.py      /api/pull, /api/delete, /api/copy, /api/create (created models: loader/created.py)

The app's ServerState and the stream plumbing are shared with the OpenAI API (entrypoints/server_state.py,
entrypoints/streaming.py).
"""
from fastapi import APIRouter

from tokenloom.entrypoints.ollama import manage, model_info, routes

router = APIRouter()
for _module in (routes, model_info, manage):
    router.include_router(_module.router)

__all__ = ["router"]
