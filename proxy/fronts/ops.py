"""Operations endpoints: `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.

`/openapi.json` serves the OpenAPI 3.1 document of the gateway's own endpoints:
`proxy/openapi.yaml` (shipped in the package; `docs/openapi.yaml` links to it),
read and converted to JSON on first request, then served from memory (per app).
The tests keep it true: every route of the app is in it and every path in it is a
route.

Not counted in request metrics (scrapes and probes would drown the signal) and
not authenticated: they reveal no key, prompt or task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

import yaml
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.jsonutil import dumps
from proxy.runtime import METRICS, RUNTIME, STATE
from proxy.upstream.health import UPSTREAMS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_document() -> dict[str, object]:
    """The parsed OpenAPI document."""
    text = resources.files("proxy").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError("proxy/openapi.yaml is not a mapping")
    return doc


def openapi_handler() -> Handler:
    """The `/openapi.json` handler of one app: the document is read on first use and kept."""
    cache: list[bytes] = []

    async def serve(request: web.Request) -> web.Response:
        if not cache:
            cache.append(dumps(load_document()))
        return web.Response(body=cache[0], content_type="application/json")

    return serve


# Route names of this front end (the middleware passes them straight through).
ROUTES = frozenset({"ops.metrics", "ops.healthz", "ops.readyz"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    holder = request.app[RUNTIME]
    problems = []
    if holder.draining:
        problems.append("draining")
    if not holder.current.config.upstreams:
        problems.append("no upstreams configured")
    # Degraded still serves (e.g. Redis down: local fallback), so it stays 200.
    degraded = request.app[STATE].problems() if STATE in request.app else []
    degraded += [
        f"upstream {name}: circuit open"
        for name in request.app[UPSTREAMS].open_circuits(holder.current.config.upstreams)
    ]
    body = {
        "status": ("not ready" if problems else "degraded" if degraded else "ready"),
        "problems": problems,
        "degraded": degraded,
    }
    return web.json_response(body, status=200 if not problems else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    data = generate_latest(request.app[METRICS].exposition)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, name="ops.healthz")
    app.router.add_get("/readyz", readyz, name="ops.readyz")
    app.router.add_get("/metrics", metrics_endpoint, name="ops.metrics")
    app.router.add_get("/openapi.json", openapi_handler(), name="ops.openapi")
