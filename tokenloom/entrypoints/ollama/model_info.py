"""Model information: /api/tags, /api/ps, /api/show, /api/version.

/api/tags lists the served model, the created models (loader/created.py; those based on another model are listed
but not served here) and the pulled catalogue models; /api/show shows any of them."""
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
    ModelDetails,
    PsResponse,
    ShowRequest,
    ShowResponse,
    TagsResponse,
    VersionResponse,
)
from tokenloom.entrypoints.app_state import ServerState, get_state
from tokenloom.entrypoints.server_state import APIError, ServedModel
from tokenloom.entrypoints.tool_calls import template_supports_tools
from tokenloom.loader import created as created_store
from tokenloom.loader.created import CreatedModel
from tokenloom.loader.modelfile import format_parameters, write_modelfile
from tokenloom.loader.sources import catalogue_key, list_models, resolve_model
from tokenloom.loader.variants import QUANT_LEVEL, TAGS, split_tag
from tokenloom.version import __version__

router = APIRouter(tags=["Ollama"])


def _model_facts(state: ServedModel) -> dict:
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
    quant = QUANT_LEVEL.get(split_tag(state.name)[1], quant)  # a variant's tag says what it runs as
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
        "details": details, "size": size, "digest": h.hexdigest(), "path": str(src.path), "template": "",
        "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z"),
        "model_info": model_info,
    }
    return state._model_info


async def _facts(state: ServedModel) -> dict:
    if state._model_info is None:
        await asyncio.to_thread(_model_facts, state)
    return state._model_info


def _tag(state: ServedModel, facts: dict) -> dict:
    return {"name": state.served_model_name, "model": state.served_model_name, "modified_at": facts["modified_at"],
            "size": facts["size"], "digest": facts["digest"], "details": facts["details"]}


def _variant_tag(name: str, facts: dict) -> dict:
    """A /api/tags entry for a variant not loaded: its file's facts, with the quantization its tag gives."""
    tag = split_tag(name)[1]
    details = {**facts["details"], "quantization_level": QUANT_LEVEL.get(tag, facts["details"]["quantization_level"])}
    return {"name": name, "model": name, "modified_at": facts["modified_at"], "size": facts["size"],
            "digest": hashlib.sha256(f"{facts['digest']}:{tag}".encode()).hexdigest() if tag else facts["digest"],
            "details": details}


def _all_tags(app: ServerState) -> list[dict]:
    """`tokenloom serve` (many models): each model it can load with each of its tags, the loaded ones as
    loaded; then created models and routes."""
    out = []
    for base, source in app.pool.sources.known().items():
        facts = _other_facts(source)
        for tag in TAGS:
            name = base if tag == "latest" else f"{base}:{tag}"
            loaded = app.pool.loaded.get(name)
            out.append(_tag(loaded, _model_facts(loaded)) if loaded is not None else _variant_tag(name, facts))
    return out


@router.get("/api/tags", response_model=TagsResponse, responses={401: ERRORS[401]})
async def tags(request: Request):
    """Models available: the served model (`serve MODEL`) or every model the server can load with its tags
    (`serve`), then the created and pulled ones, the LoRA adapters, then the A/B routes."""
    app = get_state(request)
    if app.multi:
        listed = await asyncio.to_thread(_all_tags, app)
        listed += await asyncio.to_thread(_other_tags, app, None)
    else:
        state = app.primary_model()
        facts = await _facts(state)
        listed = [_tag(state, facts)] + await asyncio.to_thread(_other_tags, app, facts)
    for model in list(app.pool.loaded.values()):  # LoRA adapters, listed with the model they run on
        base = _tag(model, await _facts(model))
        for name, lora in model.adapters.items():
            listed.append({**base, "name": name, "model": name,
                           "digest": hashlib.sha256(f"{base['digest']}:{lora.lora_path}".encode()).hexdigest(),
                           "details": {**base["details"], "parent_model": model.name}})
    by_name = {t["name"]: t for t in listed}
    for route, split in app.router.routes.items():
        first = by_name.get(split[0][0]) or next(iter(by_name.values()), None)
        if first is not None:
            listed.append({**first, "name": route, "model": route,
                           "details": {**first["details"], "parent_model": split[0][0]}})
    return {"models": listed}


@router.get("/api/ps", response_model=PsResponse, responses={401: ERRORS[401]})
async def ps(request: Request):
    """Models loaded in memory, most recently used first. size: the weights plus the KV cache now in memory;
    kv_cache_bytes: the KV pool reserved, of which kv_cache_resident_bytes is in memory (free blocks go back to
    the OS); expires_at: when it unloads unless used again (far ahead while in use, or for a kept model)."""
    app = get_state(request)
    never = (datetime.now(UTC) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    out = []
    for state in sorted(app.pool.loaded.values(), key=lambda m: -m.last_used):
        facts = await _facts(state)
        st = state.engine.stats()
        expires = _iso(state.expires_at) if state.expires_at is not None else never
        out.append({**_tag(state, facts), "size": state.weight_bytes + st.kv_resident_bytes, "expires_at": expires,
                    "size_vram": 0, "context_length": state.engine.max_model_len, "kv_cache_bytes": st.kv_cache_bytes,
                    "kv_cache_resident_bytes": st.kv_resident_bytes})
    return {"models": out}


@router.post("/api/show", response_model=ShowResponse, responses=ERRORS)
async def show(body: ShowRequest, request: Request):
    """Model details, Modelfile, chat template, parameters, architecture facts and capabilities: of a loaded
    model, a created model, a model this server can load, or a pulled catalogue model."""
    app = get_state(request)
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required", param="model")
    short = name.removesuffix(":latest")
    loaded = app.pool.loaded.get(app.router.choose(short) or short) if app.multi else app.primary_model()
    if loaded is not None and (app.multi or short == loaded.name):
        return _show_served(loaded, await _facts(loaded))
    created = await asyncio.to_thread(created_store.load, name)
    if created is not None:
        primary = app.primary_model()
        served = primary is not None and created.base == primary.identity()
        facts = await _facts(primary) if served else await asyncio.to_thread(_other_facts, created.base)
        return _show_created(primary, created, facts, served)
    key = catalogue_key(name)
    primary = app.primary_model()
    if key is not None and primary is not None and key == primary.identity():  # served under another name
        return _show_served(primary, await _facts(primary))
    base, tag = split_tag(short)
    found = app.pool.sources.lookup(base) if app.multi else None
    if found is None and key is not None and any(k == key for k, *_ in list_models()):
        found = (key, key)
    if found is not None:
        facts = await asyncio.to_thread(_other_facts, found[1])
        if tag is not None:
            facts = {**facts, "details": _variant_tag(short, facts)["details"]}
        return _show(facts, write_modelfile(facts["path"], name=short), "", facts["template"])
    raise APIError(404, f"model '{name}' not found", type="not_found_error", param="model", code="model_not_found")


def _chat_template(state: ServedModel) -> str:
    template = ""
    if state.tokenizer is not None:
        try:
            template = state.tokenizer.chat_template or ""
        except Exception:  # noqa: BLE001
            template = ""
        if isinstance(template, dict):
            template = template.get("default", "")
    return template


def _show(facts: dict, modelfile: str, parameters: str, template: str, **extra) -> dict:
    caps = ["completion"] + (["tools"] if template_supports_tools(template) else []) + ["embedding"]
    return {"modelfile": modelfile, "parameters": parameters, "template": template, "details": facts["details"],
            "model_info": facts["model_info"], "capabilities": caps, "modified_at": facts["modified_at"], **extra}


def _show_served(state: ServedModel, facts: dict) -> dict:
    template = _chat_template(state)
    modelfile = write_modelfile(facts["path"], template=template, parameters=OLLAMA_DEFAULTS,
                                name=state.served_model_name)
    return _show(facts, modelfile, format_parameters(OLLAMA_DEFAULTS), template)


def _show_created(state: ServedModel | None, model: CreatedModel, facts: dict, served: bool) -> dict:
    """A created model: its own system prompt, parameters, messages, license (and template, when it has one)
    over its base's facts."""
    base_template = _chat_template(state) if served else facts["template"]
    modelfile = write_modelfile(model.base, template=model.template, system=model.system,
                                parameters=model.parameters, messages=model.messages, license=model.license,
                                name=model.name)
    details = {**facts["details"], "parent_model": model.parent}
    return _show({**facts, "details": details, "modified_at": _iso(created_store.modified_at(model))}, modelfile,
                 format_parameters(model.parameters), model.template or base_template, system=model.system or "",
                 license="\n".join(model.license), messages=model.messages)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


_OTHER_FACTS: dict[tuple, dict] = {}


def _other_facts(base: str) -> dict:
    """What /api/tags and /api/show say of a model this server does not serve, read from its metadata (best
    effort: a model that is not on disk, or not readable, gets empty details)."""
    details = {"parent_model": "", "format": "gguf", "family": "", "families": [], "parameter_size": "",
               "quantization_level": ""}
    empty = {"details": details, "size": 0, "digest": hashlib.sha256(base.encode()).hexdigest(), "path": base,
             "modified_at": _iso(0), "model_info": {}, "template": ""}
    try:
        src = resolve_model(base, download=False)
        path = Path(src.path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        size, mtime = sum(f.stat().st_size for f in files), max((f.stat().st_mtime for f in files), default=0.0)
    except Exception:  # noqa: BLE001 - not pulled, moved, unreadable
        return empty
    key = (base, str(path), size, mtime)
    if key not in _OTHER_FACTS:
        from tokenloom.loader.inspect import describe_model

        try:
            info = describe_model(str(path))
        except Exception:  # noqa: BLE001
            info = {}
        arch = info.get("architecture", "")
        quant = info.get("quantization", "").split(",")[0].split(" x")[0].strip().upper()
        model_info = {"general.architecture": arch} if arch else {}
        if arch and info.get("context length", "").isdigit():
            model_info[f"{arch}.context_length"] = int(info["context length"])
        _OTHER_FACTS[key] = {
            "details": {**details, "format": "gguf" if src.kind == "gguf" else "safetensors", "family": arch,
                        "families": [arch] if arch else [], "parameter_size": _size_label(info.get("parameters", "")),
                        "quantization_level": quant},
            "size": size, "digest": hashlib.sha256(f"{path}:{size}:{mtime}".encode()).hexdigest(),
            "path": str(path), "modified_at": _iso(mtime), "model_info": model_info,
            "template": info.get("chat template", "") or "",
        }
    return _OTHER_FACTS[key]


def _size_label(p: str) -> str:
    """describe_model's "134.5M" as the served model's details write it ("134.50M")."""
    try:
        n = float(p[:-1]) * (1e9 if p.endswith("B") else 1e6)
    except ValueError:
        return p
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _other_tags(app: ServerState, facts: dict | None) -> list[dict]:
    """/api/tags entries after the served model's (facts): created models, then pulled catalogue models not
    served (with `serve MODEL`; with `serve` they are listed with their tags already)."""
    out = []
    primary = app.primary_model()
    identity = primary.identity() if primary is not None else None
    for m in created_store.list_created():
        base = facts if facts is not None and m.base == identity else _other_facts(m.base)
        out.append({"name": m.name, "model": m.name, "modified_at": _iso(created_store.modified_at(m)),
                    "size": base["size"], "digest": m.digest,
                    "details": ModelDetails(**{**base["details"], "parent_model": m.parent}).model_dump()})
    for key, _, _ in list_models() if not app.multi else ():
        if key != identity:
            f = _other_facts(key)
            out.append({"name": key, "model": key, "modified_at": f["modified_at"], "size": f["size"],
                        "digest": f["digest"], "details": f["details"]})
    return out


@router.get("/api/version", response_model=VersionResponse)
async def version(request: Request):
    """The server's version (tokenloom's)."""
    return {"version": __version__}
