"""The server's state (one per app): its model pool, metrics and A/B routes, and how a request's model name
becomes the loaded model that serves it.

Two modes:
    `tokenloom serve MODEL`  one model, loaded at start: requests name it (any name when OpenAI's model is left
                             out) or a created model based on it; other names are 404, as vLLM does.
    `tokenloom serve`        every model the server can resolve (model_pool.ModelSources), with tags for variants
                             (loader/variants.py), loaded on demand, as Ollama does.
Either way a route name (routing.py) is first replaced by the variant drawn for the request.
"""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request

from tokenloom.config import TokenloomError, parse_duration
from tokenloom.entrypoints.model_pool import ModelPool
from tokenloom.entrypoints.routing import Router
from tokenloom.entrypoints.server_state import AdapterView, APIError, ServedModel
from tokenloom.loader import created as created_store
from tokenloom.loader.created import CreatedModel
from tokenloom.loader.variants import TAGS, split_tag, variant

LEASES = "tokenloom.leases"  # scope key: the leases a request holds (released by the server's gate)
SERVED_MODEL = "tokenloom.model"  # scope key: the model that served the request (for error metrics)


def parse_keep_alive(value) -> float | None:
    """A request's keep_alive in seconds (None when not given; negative: keep loaded); 400 when malformed."""
    try:
        return parse_duration(value)
    except TokenloomError as exc:
        raise APIError(400, f"invalid keep_alive: {exc}", param="keep_alive") from None


class ServerState:
    def __init__(self, pool: ModelPool, metrics=None, router: Router | None = None, primary: str | None = None):
        self.pool, self.metrics, self.router = pool, metrics, router or Router()
        self.primary = primary  # `serve MODEL`: the model's served name
        self.created = int(time.time())
        self.pool.watch(self.router.variants())

    @property
    def multi(self) -> bool:
        return self.pool.on_demand

    def primary_model(self) -> ServedModel | None:
        return self.pool.loaded.get(self.primary) if self.primary is not None else None

    def adapter_owner(self, model: str | None) -> ServedModel:
        """The loaded model LoRA adapters are added to: `serve MODEL`'s, or the loaded model named `model`."""
        if not self.multi and not model:
            return self.primary_model()
        if not model:
            raise APIError(400, "model is required: the loaded model to add the adapter to", param="model")
        found = self.pool.loaded.get(model.removesuffix(":latest"))
        if found is None:
            raise APIError(404, f"model '{model}' is not loaded", type="not_found_error", param="model",
                           code="model_not_found")
        return found

    def reload_routes(self, data=None) -> dict:
        """Routes from `data`, or from the routes file again; the variants they name start recording quality."""
        routes = self.router.set(data) if data is not None else self.router.reload()
        self.pool.watch(self.router.variants())
        return routes

    # ---- names -----------------------------------------------------------------------------------------------
    def known_names(self) -> list[str]:
        """Every name a request may give: models with their tags, created models and routes."""
        if not self.multi:
            names = [self.primary] if self.primary else []
        else:
            names = [base if t == "latest" else f"{base}:{t}" for base in self.pool.sources.known() for t in TAGS]
        created = [created_store.short_name(m.name) for m in created_store.list_created()]
        adapters = [a for m in self.pool.loaded.values() for a in m.adapters]
        return names + adapters + created + list(self.router.routes)

    def not_found(self, name: str, ollama: bool) -> APIError:
        known = ", ".join(self.known_names()) or "none"
        if ollama:
            return APIError(404, f"model '{name}' not found (known: {known})", type="not_found_error",
                            param="model", code="model_not_found")
        return APIError(404, f"The model `{name}` does not exist (known: {known})", type="not_found_error",
                        param="model", code="model_not_found")

    async def resolve(self, request: Request, name: str | None, ollama: bool = False, keep_alive=None,
                      user: str | None = None) -> tuple[str, CreatedModel | None, ServedModel]:
        """(the name to answer with, the created model whose defaults apply or None, the loaded model) for a
        request's model name; the model is leased until the response is sent. APIError 404 for unknown names."""
        keep = parse_keep_alive(keep_alive)
        if name and (chosen := self.router.choose(name, user)) is not None:
            if self.metrics is not None:
                self.metrics.observe_route(name, chosen)
            name = chosen
        if self.multi:
            answer, created, model = await self._resolve_multi(name, ollama, keep)
        else:
            answer, created, model = self._resolve_single(name, ollama)
            model.acquire()
        leases = request.scope.get(LEASES)
        if leases is not None:
            leases.append(model)
        else:  # outside the server's gate (no response to wait for): the lease ends at once
            model.release()
        request.scope[SERVED_MODEL] = model.name
        return answer, created, model

    def _resolve_single(self, name: str | None, ollama: bool) -> tuple[str, CreatedModel | None, ServedModel]:
        model = self.primary_model()
        if not name:
            if ollama:
                raise APIError(400, "model is required", param="model")
            return model.name, None, model
        key = name.removesuffix(":latest") if ollama or name.endswith(":latest") else name
        if key == model.name:
            return model.name, None, model
        if key in model.adapters:
            return key, None, AdapterView(model, model.adapters[key])
        created = created_store.load(name)
        if created is not None:
            if created.base == model.identity():
                return name, created, model
            raise APIError(404, f"model '{name}' is not loaded by this server: it is created from "
                                f"'{created.base}', and this server serves '{model.name}'",
                           type="not_found_error", param="model", code="model_not_loaded")
        if ollama:
            raise APIError(404, f"model '{name}' not found", type="not_found_error", param="model",
                           code="model_not_found")
        raise APIError(404, f"The model `{name}` does not exist (this server serves `{model.name}`)",
                       type="not_found_error", param="model", code="model_not_found")

    async def _resolve_multi(self, name: str | None, ollama: bool, keep: float | None
                             ) -> tuple[str, CreatedModel | None, ServedModel]:
        pool = self.pool
        if not name:
            if ollama or not pool.loaded:
                raise APIError(400, "model is required", param="model")
            name = max(pool.loaded.values(), key=lambda m: m.last_used).name  # OpenAI: the model last used
        owner = next((m for m in pool.loaded.values() if name.removesuffix(":latest") in m.adapters), None)
        if owner is not None:  # a LoRA adapter of a loaded model
            owner.acquire()
            return name.removesuffix(":latest"), None, AdapterView(owner, owner.adapters[name.removesuffix(":latest")])
        created = created_store.load(name) if ":" not in name or split_tag(name)[1] is None else None
        if created is not None:
            base = created.base
            listed = next((n for n, s in pool.sources.known().items() if s == base), None)
            wanted, source, answer = variant(listed or Path(base).stem, None), base, created_store.short_name(name)
        else:
            base, tag = split_tag(name.removesuffix(":latest"))
            found = pool.sources.lookup(base)
            if found is None:
                raise self.not_found(name, ollama)
            wanted, source = variant(found[0], tag), found[1]
            answer = wanted.name
        return answer, created, await pool.get(wanted, source, keep)


def get_state(request: Request) -> ServerState:
    """The app's state: its models, metrics and routes."""
    return request.app.state.tokenloom
