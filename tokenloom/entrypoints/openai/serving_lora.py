"""LoRA adapters added and removed at run time (vLLM's endpoints), on a server started with --enable-lora.

    POST /v1/load_lora_adapter    {"lora_name": ..., "lora_path": ...}: a PEFT folder or a GGUF adapter; requests
                                  then name it as their model
    POST /v1/unload_lora_adapter  {"lora_name": ...}

Adapters attach to `serve MODEL`'s model, or (serving many models) to the loaded model the body's `model` names.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenloom.entrypoints.app_state import get_state
from tokenloom.entrypoints.openai.protocol import ERROR_RESPONSES
from tokenloom.entrypoints.server_state import APIError

router = APIRouter(tags=["OpenAI"])
_NAME = Field(..., min_length=1, max_length=256, description="The name requests give as their model")


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = _NAME
    lora_path: str = Field(..., min_length=1, max_length=4096,
                           description="A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a "
                                       "llama.cpp GGUF adapter, on the server's file system")
    model: str | None = Field(None, max_length=256, description="Serving many models: the loaded model to add it to")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = _NAME
    lora_int_id: int | None = Field(None, description="Ignored (adapters are named)")


_OK = {200: {"content": {"text/plain": {}}, "description": "Done"}}
_ERRORS = {k: ERROR_RESPONSES[k] for k in (400, 401, 404)}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses={**_OK, **_ERRORS})
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
    """Add a LoRA adapter: requests naming it run on the base model's weights with its deltas."""
    state = get_state(request)
    owner = state.adapter_owner(body.model)
    await owner.load_adapter(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses={**_OK, **_ERRORS})
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
    """Remove a LoRA adapter (400 while requests still run with it)."""
    state = get_state(request)
    owner = next((m for m in state.pool.loaded.values() if body.lora_name in m.adapters), None)
    if owner is None:
        owner = state.adapter_owner(None) if not state.multi else None
    if owner is None:
        raise APIError(404, f"no LoRA adapter named '{body.lora_name}' is loaded", type="not_found_error",
                       param="lora_name", code="lora_not_found")
    await owner.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
