"""/v1/embeddings: the mean of the final-norm hidden states over the input tokens, L2-normalised."""
from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenloom.entrypoints.openai.protocol import ERROR_RESPONSES, EmbeddingRequest, EmbeddingResponse, usage
from tokenloom.entrypoints.app_state import get_state
from tokenloom.entrypoints.server_state import APIError, embed_inputs

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    """Embeddings: the mean over the input tokens of the model's final-norm hidden states (the LM head's
    input), L2-normalised (unit length, so a dot product is the cosine similarity)."""
    model, _, state = await get_state(request).resolve(request, body.model, user=body.user)
    hidden = state.engine.model_config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions must be the model's hidden size {hidden}", param="dimensions")
    inputs = [body.input] if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)) \
        else list(body.input)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    vectors, n_tokens = await embed_inputs(state, inputs)
    data = []
    for i, vec in enumerate(vectors):
        emb: list[float] | str = vec
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage(n_tokens, 0)})
