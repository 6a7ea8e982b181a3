"""/v1/models: the served model, and the created models this server serves with it (loader/created.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from tokenloom.entrypoints.openai.protocol import ERROR_RESPONSES, ModelCard, ModelList
from tokenloom.entrypoints.server_state import ServerState, get_state

router = APIRouter(tags=["OpenAI"])


def _card(state: ServerState, name: str | None = None, created: int | None = None) -> dict:
    return {"id": name or state.served_model_name, "object": "model", "created": created or state.created,
            "owned_by": "tokenloom", "max_model_len": state.engine.max_model_len}


@router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
async def list_models(request: Request):
    """The served model, then the created models based on it (served with their own defaults)."""
    state = get_state(request)
    return {"object": "list", "data": [_card(state)] + [_card(state, m.name, int(m.created_at))
                                                        for m in state.servable_created()]}


@router.get("/v1/models/{model}", response_model=ModelCard, responses={k: ERROR_RESPONSES[k] for k in (401, 404)})
async def retrieve_model(model: str, request: Request):
    state = get_state(request)
    name, created = state.lookup_model(model)
    return _card(state, name if created else None, int(created.created_at) if created else None)
