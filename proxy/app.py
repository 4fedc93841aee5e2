"""create_app(config): routes, the request pipeline, and the lifecycles of shared resources.

The pipeline (`pipeline`, around every API route's handler) is the only place
that renders errors (in the caller's dialect, and only before a response has
started), counts requests, tracks in-flight requests and writes the access
line. Shared resources are created
in cleanup contexts and closed after `yield`, in reverse order.

`Activity` is what the drain (proxy.ops.server) waits on: the requests in
flight, and whether a scrape of /metrics has seen every count since.
`create_metrics_app` is the metrics listener's app (`server.metrics_port`),
which serves only the operations endpoints and outlives the API listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import IO, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config.model import Config
from proxy.core import idempotency
from proxy.core.admission import limits_ctx
from proxy.core.reconciler import reconciler_ctx
from proxy.errors import (
    GatewayError,
    dialect_for,
    from_http_status,
    internal_error,
    method_not_allowed_on,
    render_error,
    too_large,
    unknown_path,
)
from proxy.fronts import aliyun, images, native, ops
from proxy.fronts.openai import images as openai_images
from proxy.metering import Meter
from proxy.metrics import Metrics
from proxy.ops.accesslog import AccessLog
from proxy.ops.ledger_follow import ledger_ctx
from proxy.runtime import (
    CTX,
    METER,
    METRICS,
    RUNTIME,
    SESSION,
    STATE,
    TASKS,
    Handler,
    RequestContext,
    Routes,
    Runtime,
    RuntimeHolder,
)
from proxy.state.backends import open_state
from proxy.storage.keeper import keeper_ctx
from proxy.upstream.call import make_session
from proxy.upstream.deadline import DEADLINES, Deadlines
from proxy.upstream.health import UPSTREAMS, UpstreamHealth
from proxy.upstream.relay import ABORTED, ANSWER, AWAITED, answer_lost, lost_reason

log = logging.getLogger(__name__)

ACCESS_LOG = web.AppKey("access_log", AccessLog)


class Activity:
    """Requests in flight (their tasks, so a drain can cut them) and when counts last
    changed versus when /metrics was last scraped (monotonic seconds)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._scrape = asyncio.Event()
        self.changed_at = -math.inf
        self.scraped_at = -math.inf

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def begin(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        self._idle.clear()

    def end(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self.changed()  # its request counter, and any images it metered
        if not self._tasks:
            self._idle.set()

    def changed(self, *_: object) -> None:
        """Something a scrape shows changed (a `Meter` listener too: reconciler counts)."""
        self.changed_at = time.monotonic()

    def scraped(self) -> None:
        self.scraped_at = time.monotonic()
        self._scrape.set()

    async def idle(self, seconds: float) -> bool:
        """Wait up to `seconds` for no request to be in flight; whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(seconds, 0.0))
        return not self._tasks

    async def cut(self, seconds: float) -> int:
        """Cancel every request still in flight and wait (up to `seconds`) for their
        handlers to record what they lose; how many were cut."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=seconds)
        return len(tasks)

    def unscraped(self) -> bool:
        """Has anything changed since the last scrape began?"""
        return self.changed_at > self.scraped_at

    async def scrape_after(self, moment: float, seconds: float) -> bool:
        """Wait up to `seconds` for a scrape that begins after `moment`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.scraped_at <= moment:
            self._scrape.clear()
            try:
                await asyncio.wait_for(self._scrape.wait(), deadline - loop.time())
            except TimeoutError:
                return self.scraped_at > moment
        return True


ACTIVITY = web.AppKey("activity", Activity)


def _client_gone(request: web.Request) -> bool:
    """The client closed its connection before its answer was written (499), as opposed
    to the gateway closing it because DashScope failed mid-relay."""
    if request.get(ABORTED):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


def _release(ctx: RequestContext) -> None:
    """Run the request's cleanups (limits: the concurrency slot, the reservation), once."""
    for cleanup in ctx.cleanups:
        try:
            cleanup()
        except Exception:
            log.exception("request cleanup failed (request %s)", ctx.request_id)
    ctx.cleanups.clear()


def _awaiting_dashscope(request: web.Request, ctx: RequestContext) -> bool:
    """Was a DashScope answer outstanding (sent, not yet received whole)?"""
    state = request.get(ANSWER)
    return state == AWAITED or (state is None and ctx.upstream is not None)


def _http_exception_to_gateway(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 404:
        return unknown_path(request.path)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return method_not_allowed_on(request.method, exc.allowed_methods)
    if exc.status == 413:
        return too_large(request.app[RUNTIME].current.config.server.max_body_bytes)
    return from_http_status(exc.status, exc.reason)


def new_request_id() -> str:
    """A random (version 4) UUID string, a third of `str(uuid.uuid4())`'s cost per request."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def pipeline(handler: Handler, route: str) -> Handler:
    """`handler`, of the route named `route` (a metric label), in the request pipeline:
    the only place that renders errors, counts requests, runs the request's cleanups
    and writes its access line. Every API route is added through it (`Routes`)."""

    # The whole pipeline is this one coroutine per request (see `Routes`).
    async def in_pipeline(request: web.Request) -> web.StreamResponse:
        app = request.app
        ctx = RequestContext(request_id=new_request_id(), route=route)
        request[CTX] = ctx
        metrics = app[METRICS]
        gauge = metrics.inflight_gauge(route)
        gauge.inc()
        activity = app[ACTIVITY]
        task = asyncio.current_task()
        if task is not None:
            activity.begin(task)
        status = 500
        try:
            try:
                response = await handler(request)
            except GatewayError as exc:
                ctx.error_code = ctx.error_code or exc.code
                reason = lost_reason(exc)
                if reason is not None:
                    # Failed after it was sent (no answer, or none whole): DashScope may
                    # have generated images. Once per request (the relay may have already).
                    await answer_lost(request, reason)
                response = render_error(exc, dialect_for(route, request.path), ctx.request_id)
            except web.HTTPException as exc:
                if isinstance(exc, web.HTTPMethodNotAllowed) and request.method == "OPTIONS":
                    # RFC 9110: OPTIONS describes what the path takes, and is no error.
                    allow = ", ".join(sorted({*exc.allowed_methods, "OPTIONS"}))
                    response = web.Response(status=204, headers={"Allow": allow})
                else:
                    mapped = _http_exception_to_gateway(exc, request)
                    ctx.error_code = mapped.code
                    response = render_error(
                        mapped, dialect_for(route, request.path), ctx.request_id
                    )
            except asyncio.CancelledError:
                status = 499  # the connection closes without an answer
                if app[RUNTIME].draining and _awaiting_dashscope(request, ctx):
                    # Cut at the end of the drain while DashScope was answering.
                    await answer_lost(request, "drain_cut")
                await idempotency.finish(request, None)
                raise
            except ConnectionResetError:
                status = 499  # client closed request (nginx's convention)
                await idempotency.finish(request, None)
                raise
            except Exception:
                log.exception("unhandled error in %s (request %s)", route, ctx.request_id)
                internal = internal_error()
                ctx.error_code = internal.code
                response = render_error(internal, dialect_for(route, request.path), ctx.request_id)
            # Kept (if it reached DashScope) before the client can read it and repeat it.
            await idempotency.finish(request, response)
            # A client that went away while DashScope answered: the handler ran on (the
            # images are counted), but the client got nothing.
            status = 499 if _client_gone(request) else response.status
            # The concurrency slot is free before the client has the answer (its next
            # request may come at once); the request's own bookkeeping (the request
            # metrics, the access line) waits until the answer is on its way.
            _release(ctx)
            if status != 499 and not response.prepared:
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    status = 499
                except asyncio.CancelledError:
                    status = 499
                    raise
            return response
        finally:
            _release(ctx)
            try:
                seconds = time.perf_counter() - ctx.started
                metrics.count_request(route, ctx.key, ctx.model_label, status, seconds)
                config = app[RUNTIME].current.config
                if config.server.access_log:
                    app[ACCESS_LOG].write(
                        ctx, request.method, status, seconds, config.server.log_prompts
                    )
            finally:
                # In flight until its bookkeeping is done: a drain (and the in-flight
                # gauge) sees a request end only once its counter and line are written.
                if task is not None:
                    activity.end(task)
                gauge.dec()

    return in_pipeline


def create_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    access_stream: IO[bytes] | None = None,
    metrics_dir: str | None = None,
) -> web.Application:
    """The gateway application for `config`. Tests pass a fresh `registry`.

    `metrics_dir`: prometheus_client's multiprocess directory when this is one
    of several workers (see proxy.ops.supervisor).
    """
    # The body limit is enforced by inbound.read_body (from Content-Length, before
    # reading); aiohttp's own cap is set above it so it never answers first.
    app = web.Application(client_max_size=config.server.max_body_bytes + 1024 * 1024)
    app[RUNTIME] = RuntimeHolder(Runtime.build(config))
    metrics = Metrics(registry if registry is not None else CollectorRegistry(), metrics_dir)
    metrics.precreate([k.name for k in config.keys], [])
    metrics.config_loaded(time.time())
    app[METRICS] = metrics
    app[METER] = Meter(metrics)
    activity = app[ACTIVITY] = Activity()
    app[METER].listeners.append(activity.changed)
    app[METER].unmetered_listeners.append(activity.changed)
    app[ACCESS_LOG] = AccessLog(access_stream if access_stream is not None else sys.stdout.buffer)
    app.cleanup_ctx.append(_session_ctx)
    app[UPSTREAMS] = UpstreamHealth(metrics)
    app[UPSTREAMS].precreate(config.upstreams)
    app.cleanup_ctx.append(_state_ctx)  # app[STATE], app[TASKS]
    app.cleanup_ctx.append(limits_ctx)
    app.cleanup_ctx.append(ledger_ctx)
    app.cleanup_ctx.append(reconciler_ctx)  # meters through the ledger: stops first
    app.cleanup_ctx.append(keeper_ctx)  # app[KEEPER] with `storage:`; uses the session
    routes = Routes(app.router, pipeline)
    native.add_routes(routes)
    openai_images.add_routes(app, routes)
    aliyun.add_routes(routes)
    images.add_routes(routes)
    ops.add_routes(app, routes, metrics=_scraped(activity))
    # Last: what no route above takes (a 404, or a 405 on a known path) is answered by
    # the pipeline too, in the caller's dialect.
    app.router.add_route("*", "/{path:.*}", pipeline(_unrouted, "unmatched"))
    return app


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """No route takes the request: 405 if its path is a route's with other methods
    (what aiohttp's router answers), else 404."""
    allowed: set[str] = set()
    catch_all = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not catch_all:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _scraped(activity: Activity) -> Handler:
    """`/metrics`, noting each scrape for the drain (`Activity.scrape_after`)."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        activity.scraped()
        return await ops.metrics_endpoint(request)

    return metrics


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    """The app's state backend (`app[STATE]`); its task store is `app[TASKS]`."""
    state = await open_state(app[RUNTIME].current.config.state, app[METRICS])
    app[STATE] = state
    app[TASKS] = state.tasks
    yield
    await state.close()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The ClientSession (`app[SESSION]`), and the deadlines of its generation calls."""
    session = make_session(app[RUNTIME].current.config.upstreams)
    app[SESSION] = session
    deadlines = app[DEADLINES] = Deadlines()
    yield
    deadlines.close()
    await session.close()


def create_metrics_app(app: web.Application) -> web.Application:
    """The app of the metrics listener (`server.metrics_port`): `/metrics`, `/healthz` and
    `/readyz` on `app`'s services, nothing else. Built once `app` has started (its state
    backend exists); it is not closed with the API listener, so scrapes go on through the
    drain."""
    ops_app = web.Application()
    ops_app[RUNTIME] = app[RUNTIME]
    ops_app[METRICS] = app[METRICS]
    ops_app[UPSTREAMS] = app[UPSTREAMS]
    if STATE in app:
        ops_app[STATE] = app[STATE]
    ops_app.router.add_get("/healthz", ops.healthz, name="ops.healthz")
    ops_app.router.add_get("/readyz", ops.readyz, name="ops.readyz")
    ops_app.router.add_get("/metrics", _scraped(app[ACTIVITY]), name="ops.metrics")
    return ops_app
