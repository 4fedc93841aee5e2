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

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources

import yaml
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.jsonutil import dumps
from proxy.runtime import METRICS, RUNTIME, SESSION, STATE, Handler, Routes
from proxy.storage.backend import StorageUnavailable
from proxy.storage.keeper import KEEPER
from proxy.upstream.health import UPSTREAMS
from proxy.upstream.probe import apply, probe_all


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


log = logging.getLogger(__name__)
# The image store's readiness check: well below a Kubernetes probe's 1 s default.
STORAGE_CHECK_SECONDS = 0.5


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while the gateway can serve; 503 when draining, with no upstream, or when
    DashScope refused the key of every upstream. Upstreams whose key was refused are
    listed under `problems` either way (the operator must fix them); what is degraded
    but still serving (Redis down: local fallback; an open circuit) under `degraded`."""
    holder = request.app[RUNTIME]
    upstreams = holder.current.config.upstreams
    health = request.app[UPSTREAMS]
    fatal = []
    if holder.draining:
        fatal.append("draining")
    if not upstreams:
        fatal.append("no upstreams configured")
    rejected = health.rejected_keys(upstreams)
    if upstreams and len(rejected) == len(upstreams):
        fatal.append("no upstream has a working DashScope key")
    problems = fatal + [f"upstream {name}: DashScope rejected its API key" for name in rejected]
    degraded = request.app[STATE].problems() if STATE in request.app else []
    degraded += [f"upstream {name}: circuit open" for name in health.open_circuits(upstreams)]
    degraded += await _storage_problems(request.app)
    body = {
        "status": ("not ready" if fatal else "degraded" if problems or degraded else "ready"),
        "problems": problems,
        "degraded": degraded,
    }
    return web.json_response(body, status=503 if fatal else 200)


async def _storage_problems(app: web.Application) -> list[str]:
    """The image store failing: answers keep DashScope's URLs meanwhile (still serving).
    Bounded well below a probe's timeout, so a slow store never fails readiness."""
    keeper = app.get(KEEPER)
    if keeper is None:
        return []
    try:
        async with asyncio.timeout(STORAGE_CHECK_SECONDS):
            await keeper.backend.check()
    except (StorageUnavailable, TimeoutError):
        return [f"storage ({keeper.backend.kind}): unavailable, images keep DashScope's URLs"]
    return []


async def metrics_endpoint(request: web.Request) -> web.Response:
    data = generate_latest(request.app[METRICS].exposition)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def probe_keys(app: web.Application) -> None:
    """Probe every upstream's key (at startup, and after each reload) and record it."""
    results = await probe_all(app[SESSION], app[RUNTIME].current.config.upstreams)
    apply(app[UPSTREAMS], results)
    for r in results:
        if not r.ok:
            log.error("upstream %s: key probe failed: %s", r.upstream, r.detail)


async def _startup_probe(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the startup key probe runs beside serving, never delaying it."""
    task = asyncio.create_task(probe_keys(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def add_routes(app: web.Application, r: Routes, metrics: Handler = metrics_endpoint) -> None:
    """The probes and `/metrics` (`metrics`: its handler) are outside the request
    pipeline: not counted, not logged, cheap. The OpenAPI document is an API route."""
    app.cleanup_ctx.append(_startup_probe)
    app.router.add_get("/healthz", healthz, name="ops.healthz")
    app.router.add_get("/readyz", readyz, name="ops.readyz")
    app.router.add_get("/metrics", metrics, name="ops.metrics")
    r.get("/openapi.json", openapi_handler(), name="ops.openapi")
