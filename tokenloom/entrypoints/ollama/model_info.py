"""Model information: /api/tags, /api/ps, /api/show, /api/version."""
from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import APIRouter, Request

from tokenloom.entrypoints.ollama.protocol import (
    ERRORS,
    OLLAMA_DEFAULTS,
    PsResponse,
    ShowRequest,
    ShowResponse,
    TagsResponse,
    VersionResponse,
)
from tokenloom.entrypoints.server_state import ServerState, get_state
from tokenloom.version import __version__

router = APIRouter(tags=["Ollama"])


def _model_facts(state: ServerState) -> dict:
    """Computed once per server: details, size, digest, modification time, model_info."""
    if state._model_info is not None:
        return state._model_info
    eng = state.engine.engine
    src, cfg = eng.model_source, eng.model_config
    path = Path(src.path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    size = sum(f.stat().st_size for f in files if f.is_file())
    mtime = max((f.stat().st_mtime for f in files if f.is_file()), default=time.time())
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and f.stat().st_size <= (4 << 30):
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        else:
            h.update(f"{f.name}:{f.stat().st_size if f.exists() else 0}".encode())
    quant = "unknown"
    params = cfg.num_params
    try:
        from tokenloom.loader.inspect import describe_model

        info = describe_model(str(src.path))
        quant = info.get("quantization", quant).split(",")[0].split(" x")[0].strip().upper()
        p = info.get("parameters")
        if p:
            params = int(float(p[:-1]) * (1e9 if p.endswith("B") else 1e6))
    except Exception:  # noqa: BLE001 - details are best effort
        pass
    if eng.config.quantization and eng.config.quantization != "gguf":  # gguf: the file's own types, as read
        quant = eng.config.quantization.upper()
    quant = {"FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16"}.get(quant, quant)
    psize = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    arch = cfg.architecture
    details = {"parent_model": "", "format": "gguf" if src.kind == "gguf" else "safetensors", "family": arch,
               "families": [arch], "parameter_size": psize, "quantization_level": quant}
    model_info = {
        "general.architecture": arch, "general.parameter_count": params, "general.name": src.name,
        f"{arch}.context_length": state.engine.max_model_len, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_heads, f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.rope.freq_base": cfg.rope_theta,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, f"{arch}.vocab_size": cfg.vocab_size,
    }
    state._model_info = {
        "details": details, "size": size, "digest": h.hexdigest(), "path": str(src.path),
        "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z"),
        "model_info": model_info,
    }
    return state._model_info


async def _facts(state: ServerState) -> dict:
    if state._model_info is None:
        await asyncio.to_thread(_model_facts, state)
    return state._model_info


def _tag(state: ServerState, facts: dict) -> dict:
    return {"name": state.served_model_name, "model": state.served_model_name, "modified_at": facts["modified_at"],
            "size": facts["size"], "digest": facts["digest"], "details": facts["details"]}


@router.get("/api/tags", response_model=TagsResponse, responses={401: ERRORS[401]})
async def tags(request: Request):
    """Models available (the served model)."""
    state = get_state(request)
    return {"models": [_tag(state, await _facts(state))]}


@router.get("/api/ps", response_model=PsResponse, responses={401: ERRORS[401]})
async def ps(request: Request):
    """Models loaded in memory (the served model, for as long as the server runs)."""
    state = get_state(request)
    facts = await _facts(state)
    expires = (datetime.now(UTC) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    return {"models": [{**_tag(state, facts), "expires_at": expires, "size_vram": 0,
                        "context_length": state.engine.max_model_len}]}


@router.post("/api/show", response_model=ShowResponse, responses=ERRORS)
async def show(body: ShowRequest, request: Request):
    """Model details, chat template and architecture facts."""
    state = get_state(request)
    state.check_model(body.model or body.name, ollama=True)
    facts = await _facts(state)
    tok = state.tokenizer
    template = ""
    if tok is not None:
        try:
            template = tok.chat_template or ""
        except Exception:  # noqa: BLE001
            template = ""
        if isinstance(template, dict):
            template = template.get("default", "")
    return {"modelfile": f"# tokenloom: {state.served_model_name}\nFROM {facts['path']}\n",
            "parameters": "\n".join(f"{k} {v}" for k, v in OLLAMA_DEFAULTS.items()), "template": template,
            "details": facts["details"], "model_info": facts["model_info"],
            "capabilities": ["completion", "embedding"], "modified_at": facts["modified_at"]}


@router.get("/api/version", response_model=VersionResponse)
async def version(request: Request):
    """The server's version (tokenloom's)."""
    return {"version": __version__}
