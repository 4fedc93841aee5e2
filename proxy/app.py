"""create_app(config): routes, the one middleware, and the lifecycles of shared resources.

The middleware is the only place that renders errors (in the caller's
dialect, and only before a response has started), counts requests, tracks
in-flight requests and writes the access line. Shared resources are created
in cleanup contexts and closed after `yield`, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config.model import Config
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
from proxy.fronts import aliyun, native, ops
from proxy.fronts.openai import images as openai_images
from proxy.metering import Meter
from proxy.metrics import Metrics
from proxy.ops.accesslog import AccessLog
from proxy.ops.ledger import ledger_ctx
from proxy.runtime import (
    CTX,
    METER,
    METRICS,
    RUNTIME,
    SESSION,
    STATE,
    TASKS,
    RequestContext,
    Runtime,
    RuntimeHolder,
)
from proxy.state.backends import open_state
from proxy.upstream.call import make_session
from proxy.upstream.health import UPSTREAMS, UpstreamHealth

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCESS_LOG = web.AppKey("access_log", AccessLog)


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


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name or "unmatched"
    if route in ops.ROUTES:
        return await handler(request)
    app = request.app
    ctx = RequestContext(request_id=new_request_id(), route=route)
    request[CTX] = ctx
    metrics = app[METRICS]
    gauge = metrics.inflight_gauge(route)
    gauge.inc()
    status = 500
    try:
        try:
            response = await handler(request)
        except GatewayError as exc:
            ctx.error_code = ctx.error_code or exc.code
            response = render_error(exc, dialect_for(route, request.path), ctx.request_id)
        except web.HTTPException as exc:
            if isinstance(exc, web.HTTPMethodNotAllowed) and request.method == "OPTIONS":
                # RFC 9110: OPTIONS describes what the path takes, and is no error.
                allow = ", ".join(sorted({*exc.allowed_methods, "OPTIONS"}))
                response = web.Response(status=204, headers={"Allow": allow})
            else:
                mapped = _http_exception_to_gateway(exc, request)
                ctx.error_code = mapped.code
                response = render_error(mapped, dialect_for(route, request.path), ctx.request_id)
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # client closed request (nginx's convention)
            raise
        except Exception:
            log.exception("unhandled error in %s (request %s)", route, ctx.request_id)
            internal = internal_error()
            ctx.error_code = internal.code
            response = render_error(internal, dialect_for(route, request.path), ctx.request_id)
        status = response.status
        return response
    finally:
        gauge.dec()
        for cleanup in ctx.cleanups:  # limits: the concurrency slot, the reservation
            try:
                cleanup()
            except Exception:
                log.exception("request cleanup failed (request %s)", ctx.request_id)
        seconds = time.perf_counter() - ctx.started
        metrics.count_request(route, ctx.key, ctx.model_label, status, seconds)
        config = app[RUNTIME].current.config
        if config.server.access_log:
            app[ACCESS_LOG].write(ctx, request.method, status, seconds, config.server.log_prompts)


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
    app = web.Application(
        middlewares=[gateway_middleware], client_max_size=config.server.max_body_bytes + 1024 * 1024
    )
    app[RUNTIME] = RuntimeHolder(Runtime.build(config))
    metrics = Metrics(registry if registry is not None else CollectorRegistry(), metrics_dir)
    metrics.precreate([k.name for k in config.keys], [])
    metrics.config_loaded(time.time())
    app[METRICS] = metrics
    app[METER] = Meter(metrics)
    app[ACCESS_LOG] = AccessLog(access_stream if access_stream is not None else sys.stdout.buffer)
    app.cleanup_ctx.append(_session_ctx)
    app[UPSTREAMS] = UpstreamHealth(metrics)
    app[UPSTREAMS].precreate(config.upstreams)
    app.cleanup_ctx.append(_state_ctx)  # app[STATE], app[TASKS]
    app.cleanup_ctx.append(limits_ctx)
    app.cleanup_ctx.append(ledger_ctx)
    app.cleanup_ctx.append(reconciler_ctx)  # meters through the ledger: stops first
    native.add_routes(app)
    openai_images.add_routes(app)
    aliyun.add_routes(app)
    ops.add_routes(app)
    return app


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    """The app's state backend (`app[STATE]`); its task store is `app[TASKS]`."""
    state = await open_state(app[RUNTIME].current.config.state, app[METRICS])
    app[STATE] = state
    app[TASKS] = state.tasks
    yield
    await state.close()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    session = make_session(app[RUNTIME].current.config.upstreams)
    app[SESSION] = session
    yield
    await session.close()
