"""Several upstreams per model: order, failover, circuit breakers and per-upstream caps.

`call_with_failover` is the one way a request that may go to any of several
upstreams (a generation, an upload policy) reaches DashScope; `call_pinned`
(`proxy.upstream.pinned`) is the way a request that must reach one upstream
(a poll or cancel of the task it created) does. Both are async context managers yielding the
`UpstreamCall` (the upstream that answered and its response): the upstream's
concurrency slot is held until the block exits, i.e. until the caller has
relayed the body.

Order: candidates sorted by `priority` (lower first); among equal priority a
weighted random order (`weight`), drawn per request. `pinned=True` keeps the
config order instead (uploads and `oss://` requests: an upload made through
one account is only visible to that account, so both must pick the same one).

What is retried on the next candidate, and why it is safe. A request moves on
only while nothing has been sent to the client (we hold the response until we
decide) and only when DashScope cannot have executed it:
- connection refused / DNS failure / TLS failure (`connect`) and connect
  timeouts (`connect_timeout`): no connection, so no request was sent;
- a full upstream (`busy`, at `max_concurrency`/`max_connections`) or an open
  circuit (`circuit_open`): we never sent it;
- HTTP 429 `Throttling*` (`throttled`) and HTTP 503 (`unavailable`): DashScope
  refused the request before running it (it neither bills nor generates).
Never retried: a read timeout or a dropped connection after the request was
sent (DashScope may be generating the images and will bill them: a second
upstream would generate and bill them again), 500/502/504 (the request may
have run), and every other answer (4xx are the caller's, and identical on any
upstream). Those are relayed (or mapped to 502/504) as before.

Whether a request reached DashScope (`RequestContext.sent`, what keeps an
`Idempotency-Key` answer, `core.idempotency`) is set here: every answer and every
failure after sending, except the answers that ran nothing (429, 503, DashScope
refusing the gateway's own key).

Circuit breaker, per upstream and per process: `circuit_breaker.failures`
failures in a row (transport failures, 429, 5xx) open it; while open the
upstream is skipped; after `cooldown_seconds` one request is let through as a
probe (half-open): success closes it, failure opens it for another cooldown.
`dashscope_proxy_upstream_up` is 1 only while it is closed.

Deliberately not here: which upstreams serve a model (`upstream.UpstreamRouter`)
and relaying the answer (`relay`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import UpstreamConfig
from proxy.errors import GatewayError, upstream_key_rejected, upstream_unavailable_now
from proxy.metrics import Metrics
from proxy.runtime import CTX, METRICS, SESSION, RequestContext
from proxy.upstream.call import (
    UpstreamFailure,
    connect_timeout,
    counts_as_failure,
    peek_error,
    peek_throttling,
    rejects_key,
    send_upstream,
    upstream_failure,
    upstream_url,
)
from proxy.upstream.deadline import DEADLINES, Deadlines, Watch
from proxy.upstream.health import UPSTREAMS, UpstreamHealth, capacity

log = logging.getLogger(__name__)

# Failure kinds after which another upstream may be tried (see the docstring).
RETRYABLE_KINDS = frozenset({"connect", "connect_timeout"})

HeadersFor = Callable[[UpstreamConfig], CIMultiDict[str]]


@dataclass(slots=True)
class UpstreamCall:
    """The upstream that answered, and its response (not yet read)."""

    upstream: UpstreamConfig
    response: aiohttp.ClientResponse


def call_with_failover(
    request: web.Request,
    candidates: Sequence[UpstreamConfig],
    endpoint: str,
    method: str,
    path: str,
    headers: HeadersFor,
    body: bytes | None,
    *,
    params: object = None,
    pinned: bool = False,
) -> AbstractAsyncContextManager[UpstreamCall]:
    """Call the first candidate that takes the request, failing over as the module doc says.

    `path` is appended to the upstream's `base_url`; `headers(upstream)` builds the
    request headers for it (its key). `pinned`: config order, and no failover once a
    request was sent (uploads, `oss://` inputs). Raises `GatewayError` (502/503/504)
    when no candidate answers; a 429/503 from the last candidate is yielded as is,
    so the client sees DashScope's own answer.
    """
    if not candidates:
        raise upstream_unavailable_now(1, "No upstream serves this request.")
    app = request.app
    health = app[UPSTREAMS]
    return _Walk(
        health,
        app[METRICS],
        app[SESSION],
        app[DEADLINES],
        request.get(CTX),
        health.order(candidates, pinned=pinned),
        pinned,
        endpoint,
        method,
        path,
        headers,
        body,
        params,
    )


@dataclass(slots=True)
class _Walk:
    """One request's walk over its candidates, and what its steps share: an async
    context manager (a plain class, not a generator: thousands wait on DashScope at
    once, and each generator frame and its wrapper is memory held per request)."""

    health: UpstreamHealth
    metrics: Metrics
    session: aiohttp.ClientSession
    deadlines: Deadlines
    ctx: RequestContext | None
    order: Sequence[UpstreamConfig]  # the candidates, in this request's order
    pinned: bool
    # What is sent to whichever upstream takes it.
    endpoint: str
    method: str
    path: str
    headers: HeadersFor
    body: bytes | None
    params: object
    # (from_upstream, reason): counted as failovers once another upstream is tried.
    # Made when first needed (most requests never need them: memory per request).
    pending: list[tuple[str, str]] | None = None
    busy: list[UpstreamConfig] | None = None  # full ones, in order
    last_failure: UpstreamFailure | None = None
    soonest: float = math.inf  # when an open circuit may take a probe
    rejected: list[str] | None = None  # upstreams that refused their key
    chosen: UpstreamCall | None = None
    watch: Watch | None = None  # the answered try's deadline, while it is read

    async def __aenter__(self) -> UpstreamCall:
        """The first candidate that takes the request (its slot held until the exit),
        or the error to raise. Each try runs here, not in a coroutine of its own: this
        frame is what waits on DashScope, thousands at once."""
        pinned = self.pinned
        order = self.order
        index = 0  # (no iterator object kept while DashScope answers)
        last_resort = False  # waiting for the preferred full upstream, once all refused
        while True:
            if index < len(order):
                u = order[index]
                index += 1
                if not self._available(u):
                    continue
                gate = self.health.gate(u.name)
                if pinned:
                    # Pinned requests must land where their upload did: wait, never skip.
                    if not await gate.enter(capacity(u), u.timeouts.connect):
                        self._full(u)
                        raise self._no_answer()
                elif not gate.try_enter(capacity(u)):
                    self._full(u)
                    self._failing_over(u.name, "busy")
                    continue
                rest = None if pinned else index
            else:
                busy = self.busy
                if last_resort or not busy or pinned:
                    raise self._no_answer()
                # Every candidate was full, open or refused: wait for the preferred full one.
                last_resort = True
                u = busy[0]
                if not await self.health.gate(u.name).enter(capacity(u), u.timeouts.connect):
                    raise self._no_answer()
                rest = None
            # One try, u's slot held: the call to yield, or a failover reason (the slot
            # then released). Failures not worth another upstream are raised.
            if not self._begin(u):
                outcome: UpstreamCall | str = "circuit_open"
            else:
                t0 = time.perf_counter()
                watch = self.deadlines.watch(u.timeouts.read, u.timeouts.total)
                try:
                    resp = await send_upstream(
                        self.session,
                        u,
                        self.method,
                        upstream_url(u, self.path),
                        self.headers(u),
                        self.body,
                        self.params,
                        connect_timeout(u),
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    watch.done()
                    outcome = self._transport_failed(u, exc, rest)
                except asyncio.CancelledError:
                    if not watch.timed_out():
                        self._abandon(u)
                        raise
                    outcome = self._transport_failed(u, TimeoutError(), rest)
                except BaseException:
                    watch.done()
                    self._abandon(u)
                    raise
                else:
                    watch.answered(resp)
                    self.watch = watch
                    self._answered(u, resp, t0)
                    if resp.status in (401, 403, 429, 503):
                        outcome = await self._refused(u, resp, rest)
                    else:
                        outcome = UpstreamCall(u, resp)
            if isinstance(outcome, UpstreamCall):
                self.chosen = outcome
                return outcome
            self._end_watch()
            if last_resort:
                raise self._no_answer()
            if outcome == "circuit_open":  # another request took the probe meanwhile
                self.soonest = min(self.soonest, 1.0)
            self._failing_over(u.name, outcome)

    async def __aexit__(self, *exc: object) -> None:
        self._end_watch()
        chosen = self.chosen
        if chosen is not None:
            self.chosen = None
            chosen.response.release()
            self.health.gate(chosen.upstream.name).leave()

    def _abandon(self, u: UpstreamConfig) -> None:
        """The try on `u` ends with neither an answer nor a failure (its slot released)."""
        self.health.breaker(u.name).abandon()
        self.health.gate(u.name).leave()

    def _end_watch(self) -> None:
        watch = self.watch
        if watch is not None:
            self.watch = None
            watch.done()

    def _available(self, u: UpstreamConfig) -> bool:
        """Is `u`'s circuit letting requests through? (If not, noted as a failover.)"""
        now = time.monotonic()
        breaker = self.health.breaker(u.name)
        if breaker.available(now):
            return True
        self.soonest = min(self.soonest, breaker.retry_in(now))
        self._failing_over(u.name, "circuit_open")
        return False

    def _failing_over(self, name: str, reason: str) -> None:
        """Upstream `name` did not take the request: a failover, once another is tried."""
        if self.pending is None:
            self.pending = []
        self.pending.append((name, reason))

    def _full(self, u: UpstreamConfig) -> None:
        if self.busy is None:
            self.busy = []
        self.busy.append(u)

    def _more(self, rest: int | None) -> bool:
        """Is there another upstream to fail over to, after `self.order[:rest]` (None:
        this is the last try)? Asked only when a try fails, so it answers for that moment."""
        if rest is None:
            return False
        if self.busy:
            return True
        now = time.monotonic()
        return any(self.health.breaker(v.name).available(now) for v in self.order[rest:])

    def _begin(self, u: UpstreamConfig) -> bool:
        """Start a try on `u`, its slot held: False (the slot released) when its circuit
        let another request take the probe meanwhile."""
        if not self.health.breaker(u.name).begin(time.monotonic()):
            self.health.gate(u.name).leave()
            return False
        if self.pending:
            for name, reason in self.pending:
                self.metrics.upstream_failovers.labels(name, reason).inc()
            self.pending = None
        if self.ctx is not None:
            self.ctx.upstream = u.name
        return True

    def _transport_failed(
        self, u: UpstreamConfig, exc: aiohttp.ClientError | TimeoutError, rest: int | None
    ) -> str:
        """The try on `u` failed in transport (its slot released): the failover reason, or
        raised when no other upstream may take the request. `rest`: where in the order
        the upstreams after `u` start (None: none may be tried after it)."""
        failure = upstream_failure(self.metrics, u, exc)
        self.health.record(u, ok=False)
        self.health.gate(u.name).leave()
        if failure.kind not in RETRYABLE_KINDS:
            self._sent()  # it may have reached DashScope (a read timeout, say)
        if failure.kind in RETRYABLE_KINDS and self._more(rest):
            self.last_failure = failure
            return failure.kind
        raise failure from None

    def _answered(self, u: UpstreamConfig, resp: aiohttp.ClientResponse, t0: float) -> None:
        """What every answer of `u` records: its time, its health, whether it ran."""
        self.metrics.upstream_timer(u.name, self.endpoint).observe(time.perf_counter() - t0)
        status = resp.status
        self.health.record(u, ok=not counts_as_failure(status))
        if status not in (401, 403, 429, 503):
            self._sent()
            if status < 400:
                self.health.key_accepted(u.name)

    async def _refused(
        self, u: UpstreamConfig, resp: aiohttp.ClientResponse, rest: int | None
    ) -> UpstreamCall | str:
        """A 401, 403, 429 or 503 from `u`: the call to yield (relayed as DashScope's
        answer), or a failover reason (its slot released) when another upstream may
        take it: `u` refused the gateway's key, or refused the request before running it."""
        gate = self.health.gate(u.name)
        if resp.status in (401, 403):
            # DashScope refusing the gateway's own key is the operator's problem, never
            # the caller's: try the next upstream, else answer 502 naming the upstream.
            try:
                code, message = await peek_error(resp)
            except BaseException:
                resp.release()
                gate.leave()
                raise
            if rejects_key(resp.status, code, message):
                self.health.key_rejected(u.name)
                self.metrics.upstream_errors.labels(u.name, code or str(resp.status)).inc()
                resp.release()
                gate.leave()
                if self.rejected is None:
                    self.rejected = []
                self.rejected.append(u.name)
                return "key_rejected"
            self._sent()  # DashScope's own 401/403 for the request (AccessDenied, say)
        elif self._more(rest):  # 429 or 503
            try:
                refused, code = (
                    await peek_throttling(resp) if resp.status == 429 else (True, str(resp.status))
                )
            except BaseException:
                resp.release()
                gate.leave()
                raise
            if refused:
                self.metrics.upstream_errors.labels(u.name, code).inc()
                resp.release()
                gate.leave()
                return "unavailable" if resp.status == 503 else "throttled"
        return UpstreamCall(u, resp)

    def _sent(self) -> None:
        if self.ctx is not None:
            self.ctx.sent = True

    def _no_answer(self) -> GatewayError:
        if self.rejected:
            return upstream_key_rejected(self.rejected)
        if self.last_failure is not None:
            return self.last_failure
        if self.busy:
            return upstream_unavailable_now(
                1,
                "Every DashScope upstream for this model is at its "
                "concurrency limit; retry shortly.",
            )
        return upstream_unavailable_now(
            self.soonest if self.soonest < math.inf else 1,
            "Every DashScope upstream for this model is unavailable right now "
            "(circuit open); retry shortly.",
        )
