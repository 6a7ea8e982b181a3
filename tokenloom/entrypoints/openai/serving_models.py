"""/v1/models: what requests may name. `serve MODEL`: the served model and the created models based on it.
`serve` (many models): every model it can load, each with its tags (variants), the created models and the A/B
routes; loaded models report their context length. LoRA adapters follow, their parent the model they run on."""
from __future__ import annotations

from fastapi import APIRouter, Request

from tokenloom.entrypoints.app_state import ServerState, get_state
from tokenloom.entrypoints.openai.protocol import ERROR_RESPONSES, ModelCard, ModelList
from tokenloom.loader import created as created_store
from tokenloom.loader.variants import TAGS

router = APIRouter(tags=["OpenAI"])


def _cards(state: ServerState) -> list[dict]:
    loaded = state.pool.loaded

    def card(name: str, created: int | None = None, root: str | None = None, parent: str | None = None) -> dict:
        model = loaded.get(name)
        return {"id": name, "object": "model", "created": created or state.created, "owned_by": "tokenloom",
                "max_model_len": model.engine.max_model_len if model is not None else None,
                "root": root or name, "parent": parent}

    if not state.multi:
        primary = state.primary_model()
        cards = [card(primary.name)]
        cards += [{**card(m.name, int(m.created_at), primary.name, primary.name),
                   "max_model_len": primary.engine.max_model_len}
                  for m in created_store.list_created() if m.base == primary.identity()]
    else:
        cards = [card(base if t == "latest" else f"{base}:{t}", root=base, parent=None if t == "latest" else base)
                 for base in state.pool.sources.known() for t in TAGS]
        cards += [card(m.name, int(m.created_at), m.base, m.parent)
                  for m in created_store.list_created()]
    for model in loaded.values():  # LoRA adapters: root is the adapter's path, parent the model under it
        cards += [{**card(name, root=lora.lora_path, parent=model.name), "max_model_len": model.engine.max_model_len}
                  for name, lora in model.adapters.items()]
    cards += [card(route, parent=split[0][0]) for route, split in state.router.routes.items()]
    return cards


@router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
async def list_models(request: Request):
    """Every model name requests may give (see the module's notes)."""
    return {"object": "list", "data": _cards(get_state(request))}


@router.get("/v1/models/{model:path}", response_model=ModelCard,
            responses={k: ERROR_RESPONSES[k] for k in (401, 404)})
async def retrieve_model(model: str, request: Request):
    state = get_state(request)
    for c in _cards(state):
        if c["id"] == model or (c["id"] == model.removesuffix(":latest")):
            return c
    raise state.not_found(model, ollama=False)
