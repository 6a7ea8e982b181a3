"""Requests naming a created model (tokenloom/loader/created.py) that this server serves: its defaults applied.

    system prompt   put first when the request's messages do not start with a system message (Ollama's rule)
    MESSAGEs        put before the request's messages (after the system prompt)
    PARAMETERs      sampling defaults; what the request sets wins
    TEMPLATE        not applied: Ollama's Go templates are not rendered (the served model's chat template is)
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tokenloom.loader.created import CreatedModel

# Ollama PARAMETER -> the OpenAI request field it fills when the request leaves that field unset
OPENAI_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}


def with_messages(created: CreatedModel | None, messages: list[dict]) -> list[dict]:
    """The conversation to render: the created model's system prompt (unless the request has its own) and
    MESSAGEs, then the request's messages."""
    if created is None:
        return messages
    lead = 1 if messages and messages[0].get("role") == "system" else 0
    system = messages[:lead] or ([{"role": "system", "content": created.system}] if created.system else [])
    return system + [dict(m) for m in created.messages] + messages[lead:]


def ollama_options(created: CreatedModel | None, options: BaseModel | None) -> dict[str, Any] | None:
    """Ollama `options` with the created model's PARAMETERs under those the request gives (None: none at all)."""
    given = options.model_dump(exclude_none=True) if options is not None else {}
    if created is None or not created.parameters:
        return given if options is not None else None
    return {**created.parameters, **given}


def apply_openai_defaults(created: CreatedModel | None, body: BaseModel, length_field: str,
                          unset_length: bool) -> None:
    """Fill the OpenAI request's unset sampling fields from the created model's PARAMETERs (num_predict ->
    length_field when unset_length says the request left its length unset)."""
    if created is None:
        return
    params = created.parameters
    for name, field in OPENAI_FIELDS.items():
        if name in params and getattr(body, field, None) is None:
            setattr(body, field, params[name])
    n = params.get("num_predict")
    if unset_length and isinstance(n, int) and n > 0:
        setattr(body, length_field, n)
