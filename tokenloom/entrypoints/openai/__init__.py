"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

    protocol.py            request / response bodies, sampling fields -> SamplingParams, documented errors
    serving_models.py      /v1/models
    serving_completion.py  /v1/completions
    serving_chat.py        /v1/chat/completions
    serving_embedding.py   /v1/embeddings
    serving_lora.py        /v1/load_lora_adapter, /v1/unload_lora_adapter

Streams are server-sent events (entrypoints/streaming.py); the app's ServerState is shared with the Ollama API.
"""
from fastapi import APIRouter

from tokenloom.entrypoints.openai import (
    serving_chat,
    serving_completion,
    serving_embedding,
    serving_lora,
    serving_models,
)

router = APIRouter()
for _module in (serving_models, serving_completion, serving_chat, serving_embedding, serving_lora):
    router.include_router(_module.router)

__all__ = ["router"]
