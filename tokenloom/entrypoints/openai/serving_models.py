"""/v1/models: the served model."""
from __future__ import annotations

from fastapi import APIRouter, Request

from tokenloom.entrypoints.openai.protocol import ERROR_RESPONSES, ModelCard, ModelList
from tokenloom.entrypoints.server_state import ServerState, get_state

router = APIRouter(tags=["OpenAI"])


def _card(state: ServerState) -> dict:
    return {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "tokenloom",
            "max_model_len": state.engine.max_model_len}


@router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
async def list_models(request: Request):
    """The served model."""
    return {"object": "list", "data": [_card(get_state(request))]}


@router.get("/v1/models/{model}", response_model=ModelCard, responses={k: ERROR_RESPONSES[k] for k in (401, 404)})
async def retrieve_model(model: str, request: Request):
    state = get_state(request)
    state.check_model(model)
    return _card(state)
