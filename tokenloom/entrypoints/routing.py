"""A/B routes: virtual model names split by weight over variants, from a JSON file (`--routes FILE`).

    {"chat": {"smollm2-135m:bf16": 0.9, "smollm2-135m:int4": 0.1}}

A request naming `chat` is served by one variant, drawn by weight; with an OpenAI `user` (or Ollama has none)
the draw is a hash of (route, user), so one user always lands on the same variant while the weights stay. The
response's `model` names the variant. The file is read again on SIGHUP or POST /admin/routes, so a bad variant
is rolled back without a restart; requests already running keep the variant they were given.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path

from tokenloom.config import TokenloomError


class RoutesError(TokenloomError):
    pass


def parse_routes(data) -> dict[str, list[tuple[str, float]]]:
    """{route: [(variant, share of the route's traffic), ...]}, validated."""
    if not isinstance(data, dict):
        raise RoutesError("routes must be a JSON object {route name: {variant: weight, ...}}")
    routes = {}
    for route, split in data.items():
        if not isinstance(route, str) or not route:
            raise RoutesError("route names must be non-empty strings")
        if not isinstance(split, dict) or not split:
            raise RoutesError(f"route '{route}' must map variants to weights, e.g. {{\"model:bf16\": 0.9, ...}}")
        weights = []
        for variant, weight in split.items():
            if not isinstance(variant, str) or not variant:
                raise RoutesError(f"route '{route}': variant names must be non-empty strings")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise RoutesError(f"route '{route}': the weight of '{variant}' must be a number >= 0")
            weights.append((variant, float(weight)))
        total = sum(w for _, w in weights)
        if total <= 0:
            raise RoutesError(f"route '{route}': the weights add up to 0")
        routes[route] = [(v, w / total) for v, w in weights]
    return routes


class Router:
    def __init__(self, path: str | Path | None = None, routes: dict | None = None, seed: int | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.routes: dict[str, list[tuple[str, float]]] = {}
        if routes is not None:
            self.set(routes)
        elif self.path is not None:
            self.reload()

    def reload(self) -> dict[str, list[tuple[str, float]]]:
        """Read the routes file again (RoutesError if it is unreadable or invalid: the routes in force stay)."""
        if self.path is None:
            raise RoutesError("the server was started without --routes FILE")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RoutesError(f"cannot read routes from {self.path}: {exc}") from None
        return self.set(data)

    def set(self, data) -> dict[str, list[tuple[str, float]]]:
        routes = parse_routes(data)
        with self._lock:
            self.routes = routes
        return routes

    def variants(self) -> set[str]:
        return {v for split in self.routes.values() for v, _ in split}

    def as_json(self) -> dict[str, dict[str, float]]:
        return {route: dict(split) for route, split in self.routes.items()}

    def choose(self, route: str, user: str | None = None) -> str | None:
        """The variant serving this request, or None if `route` is not a route."""
        split = self.routes.get(route)
        if split is None:
            return None
        if user:
            digest = hashlib.sha256(f"{route}\0{user}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            with self._lock:
                u = self._random.random()
        acc = 0.0
        for variant, share in split:
            acc += share
            if u < acc:
                return variant
        return split[-1][0]
