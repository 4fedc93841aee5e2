"""Calling exactly one upstream: task polls and cancels, which must reach the upstream
that holds the task, from a client request or from the reconciler. Its cap and circuit
breaker apply as in `proxy.upstream.failover`, without the failover."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import UpstreamConfig
from proxy.errors import upstream_key_rejected, upstream_unavailable_now
from proxy.runtime import METRICS, SESSION
from proxy.upstream.call import (
    UpstreamFailure,
    call_upstream,
    counts_as_failure,
    peek_error,
    rejects_key,
)
from proxy.upstream.failover import UpstreamCall
from proxy.upstream.health import UPSTREAMS, capacity


@contextlib.asynccontextmanager
async def call_pinned(
    app: web.Application,
    upstream: UpstreamConfig,
    endpoint: str,
    method: str,
    path: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    *,
    params: object = None,
) -> AsyncIterator[UpstreamCall]:
    """Call exactly `upstream` (task polls and cancels: the task lives there).

    Its cap applies (waiting up to the connect timeout for a slot) and its breaker:
    while open, the caller gets 503 with Retry-After at once, which the DashScope
    SDKs retry for polls, instead of a 502 that would end their wait for a task
    that still exists. Takes the app, not a request: the reconciler polls with no
    client request.
    """
    health = app[UPSTREAMS]
    metrics = app[METRICS]
    breaker = health.breaker(upstream.name)
    gate = health.gate(upstream.name)
    now = time.monotonic()
    if not breaker.begin(now):
        raise upstream_unavailable_now(
            max(breaker.retry_in(now), 1.0),
            "The DashScope upstream that holds this task is temporarily "
            "unavailable; retry shortly.",
        )
    if not await gate.enter(capacity(upstream), upstream.timeouts.connect):
        breaker.abandon()
        raise upstream_unavailable_now(
            1,
            "The DashScope upstream that holds this task is at its "
            "concurrency limit; retry shortly.",
        )
    try:
        try:
            resp = await call_upstream(
                app[SESSION],
                metrics,
                upstream,
                endpoint,
                method,
                upstream.base_url + path,
                headers,
                body,
                params=params,
            )
        except UpstreamFailure:
            health.record(upstream, ok=False)
            raise
        except BaseException:
            breaker.abandon()
            raise
        health.record(upstream, ok=not counts_as_failure(resp.status))
        if resp.status in (401, 403):
            code, message = await peek_error(resp)
            if rejects_key(resp.status, code, message):
                health.key_rejected(upstream.name)
                resp.release()
                raise upstream_key_rejected([upstream.name])
        elif resp.status < 400:
            health.key_accepted(upstream.name)
        try:
            yield UpstreamCall(upstream, resp)
        finally:
            resp.release()
    finally:
        gate.leave()
