"""What a request runs against: the config snapshot and the app's shared services.

`Runtime` is everything derived from one config (key ring, upstream router,
model labels). It is immutable and swapped whole on reload, and a handler takes
it once at the start, so a request in flight finishes on the config it started
with. The long-lived services (ClientSession, task store, metrics, meter) hang
off the app under typed `AppKey`s; per-request facts under a `RequestKey`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.auth import KeyRing
from proxy.config.model import Config
from proxy.metering import Meter
from proxy.metrics import ANONYMOUS, OTHER, Metrics, ModelLabels
from proxy.state.local import StateBackend
from proxy.state.tasks import TaskStore
from proxy.upstream.call import UpstreamRouter


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    keyring: KeyRing
    router: UpstreamRouter
    models: ModelLabels

    @classmethod
    def build(cls, config: Config, previous: Runtime | None = None) -> Runtime:
        """The runtime for `config`; a reload passes the `previous` one so models already
        seen succeeding keep their label."""
        configured: set[str] = set(config.models)
        configured.update(o.target for o in config.models.values() if o.target)
        for k in config.keys:
            configured.update(p for p in k.models if not any(c in p for c in "*?["))
        for u in config.upstreams:
            configured.update(p for p in u.models if not any(c in p for c in "*?["))
        models = (
            previous.models.reconfigured(configured)
            if previous is not None
            else ModelLabels(configured)
        )
        return cls(config, KeyRing(config.keys), UpstreamRouter(config), models)


class RuntimeHolder:
    """The current Runtime; replaced atomically by a reload."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.draining = False


@dataclass(slots=True)
class RequestContext:
    """Per-request facts filled in along the way, read by the request pipeline (metrics,
    access log) when the request ends."""

    request_id: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    key: str = ANONYMOUS
    model: str | None = None
    model_label: str = OTHER
    upstream: str | None = None
    # A generation request reached DashScope, which may have run it (set by failover;
    # not for answers DashScope refuses before running: 429, 503, the gateway's key).
    sent: bool = False
    upstream_request_id: str | None = None
    error_code: str | None = None
    images: int = 0
    prompt: str | None = None
    # Run by the request pipeline when the request ends, however it ends (limits release
    # their concurrency slot here). Synchronous and must not raise.
    cleanups: list[Callable[[], None]] = field(default_factory=list)


RUNTIME = web.AppKey("runtime", RuntimeHolder)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
TASKS = web.AppKey("tasks", TaskStore)
METER = web.AppKey("meter", Meter)
STATE = web.AppKey("state", StateBackend)
CTX = web.RequestKey("ctx", RequestContext)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Pipeline = Callable[[Handler, str], Handler]


class Routes:
    """Where a front end adds its routes. Each handler is put in the gateway's request
    pipeline (`proxy.app.pipeline`: errors in the caller's dialect, request metrics,
    limits released, the access line) once, when it is added.

    A wrapper per route rather than an aiohttp middleware: with any middleware, aiohttp
    adds its own per-application one, so every request keeps two coroutines instead of
    one for as long as DashScope takes to answer (memory per request in flight).
    """

    def __init__(self, router: web.UrlDispatcher, pipeline: Pipeline) -> None:
        self._router = router
        self._pipeline = pipeline

    def get(self, path: str, handler: Handler, *, name: str) -> None:
        """GET (and HEAD, which aiohttp answers with the headers alone) on `path`."""
        self._router.add_get(path, self._pipeline(handler, name), name=name)

    def post(self, path: str, handler: Handler, *, name: str) -> None:
        self._router.add_post(path, self._pipeline(handler, name), name=name)
