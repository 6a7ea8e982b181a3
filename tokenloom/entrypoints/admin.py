"""Operator endpoints: the A/B routes in force, changed without a restart.

    GET  /admin/routes    the routes: {route: {variant: share}}
    POST /admin/routes    a JSON body of routes replaces them; an empty body reads the --routes file again
                          (as SIGHUP does). Invalid routes are a 400 and the routes in force stay.
"""
from __future__ import annotations

import json

from fastapi import APIRouter, Request

from tokenloom.entrypoints.routing import RoutesError
from tokenloom.entrypoints.app_state import get_state
from tokenloom.entrypoints.server_state import APIError

router = APIRouter(tags=["Admin"])
_ROUTES_DOC = {"description": "The routes in force: {route: {variant: share of traffic}}", "content": {
    "application/json": {"schema": {"type": "object", "additionalProperties": {
        "type": "object", "additionalProperties": {"type": "number"}}}}}}
_ERRORS = {400: {"description": "Invalid routes (the routes in force stay)"},
           401: {"description": "Missing or wrong API key (when the server has one)"}}


@router.get("/admin/routes", responses={200: _ROUTES_DOC, 401: _ERRORS[401]})
async def get_routes(request: Request) -> dict:
    """The A/B routes in force."""
    return get_state(request).router.as_json()


@router.post("/admin/routes", responses={200: _ROUTES_DOC, **_ERRORS})
async def set_routes(request: Request) -> dict:
    """Replace the routes with the body's ({route: {variant: weight}}), or with an empty body read the --routes
    file again. Requests already running keep their variant."""
    state = get_state(request)
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}") from None
    try:
        state.reload_routes(data)
    except RoutesError as exc:
        raise APIError(400, str(exc)) from None
    return state.router.as_json()
