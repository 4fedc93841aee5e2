"""Several upstreams per model: order, failover, circuit breakers and per-upstream caps.

`call_with_failover` is the one way a request that may go to any of several
upstreams (a generation, an upload policy) reaches DashScope; `call_pinned`
is the way a request that must reach one upstream (a poll or cancel of the
task it created) does. Both are async context managers yielding the
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
import contextlib
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import UpstreamConfig
from proxy.errors import GatewayError
from proxy.jsonutil import loads
from proxy.metrics import Metrics
from proxy.runtime import CTX, METRICS, SESSION
from proxy.upstream.call import UpstreamFailure
from proxy.upstream.relay import call_upstream

log = logging.getLogger(__name__)

# Failure kinds after which another upstream may be tried (see the docstring).
RETRYABLE_KINDS = frozenset({"connect", "connect_timeout"})
# How much of a 429 body is read to learn its code before trying elsewhere.
_PEEK_LIMIT = 64 * 1024

HeadersFor = Callable[[UpstreamConfig], CIMultiDict[str]]


def _unavailable(retry_after: float, message: str) -> GatewayError:
    return GatewayError(
        503,
        "ServiceUnavailable",
        message,
        openai_type="server_error",
        openai_code="upstream_unavailable",
        retry_after=max(1, math.ceil(retry_after)),
    )


# --------------------------------------------------------------------- breaker


class Breaker:
    """One upstream's circuit: closed -> open after N failures -> probe after a cooldown."""

    __slots__ = ("failures", "open_until", "probing")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until: float | None = None  # monotonic time the cooldown ends
        self.probing = False

    @property
    def closed(self) -> bool:
        return self.open_until is None

    def available(self, now: float) -> bool:
        """Would a request be let through now (closed, or cooled down with no probe out)?"""
        if self.open_until is None:
            return True
        return now >= self.open_until and not self.probing

    def begin(self, now: float) -> bool:
        """Claim passage; a half-open upstream lets exactly one probe through."""
        if self.open_until is None:
            return True
        if now >= self.open_until and not self.probing:
            self.probing = True
            return True
        return False

    def retry_in(self, now: float) -> float:
        return 0.0 if self.open_until is None else max(0.0, self.open_until - now)

    def success(self) -> bool:
        """Record a success; True if this closed the circuit."""
        was_open = self.open_until is not None
        self.failures = 0
        self.open_until = None
        self.probing = False
        return was_open

    def failure(self, threshold: int, cooldown: float, now: float) -> bool:
        """Record a failure; True if this opened the circuit."""
        self.failures += 1
        if self.probing or (self.open_until is None and self.failures >= threshold):
            was_closed = self.open_until is None
            self.open_until = now + cooldown
            self.probing = False
            return was_closed
        return False

    def abandon(self) -> None:
        """The probe ended without an answer (cancelled): let another one try."""
        self.probing = False


# ------------------------------------------------------------------------ gate


def capacity(upstream: UpstreamConfig) -> int:
    """In-flight requests one process sends the upstream at most (HTTP/1.1: one request
    per connection, so the connection cap and the concurrency cap are the same count)."""
    if upstream.max_concurrency is None:
        return upstream.max_connections
    return min(upstream.max_connections, upstream.max_concurrency)


class Gate:
    """Counts a process's in-flight requests to one upstream, with FIFO waiters.

    The cap is passed on every call rather than fixed, so a config reload that
    changes it applies at once to new requests.
    """

    __slots__ = ("_waiters", "inflight")

    def __init__(self) -> None:
        self.inflight = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()

    def full(self, cap: int) -> bool:
        return self.inflight >= cap

    def try_enter(self, cap: int) -> bool:
        if self.inflight >= cap or self._waiters:
            return False
        self.inflight += 1
        return True

    async def enter(self, cap: int, wait_seconds: float) -> bool:
        """Wait up to `wait_seconds` for a slot; False if none came."""
        if self.try_enter(cap):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, cap)
        self._waiters.append(entry)
        granted = False
        try:
            async with asyncio.timeout(wait_seconds):
                await fut
            granted = True
            return True
        except TimeoutError:
            return False
        finally:
            if not granted:
                if fut.done() and not fut.cancelled():
                    self.leave()  # a slot was handed over as we gave up: pass it on
                else:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)

    def leave(self) -> None:
        self.inflight -= 1
        while self._waiters:
            fut, cap = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.inflight >= cap:
                break
            self._waiters.popleft()
            self.inflight += 1
            fut.set_result(None)


# -------------------------------------------------------------------- registry


class UpstreamHealth:
    """Breakers and gates of every upstream (by name, so they survive config reloads)."""

    def __init__(self, metrics: Metrics, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._breakers: dict[str, Breaker] = {}
        self._gates: dict[str, Gate] = {}

    def precreate(self, upstreams: Sequence[UpstreamConfig]) -> None:
        for u in upstreams:
            self.breaker(u.name)

    def breaker(self, name: str) -> Breaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = Breaker()
            self.metrics.upstream_up.labels(name).set(1)
        return b

    def gate(self, name: str) -> Gate:
        g = self._gates.get(name)
        if g is None:
            g = self._gates[name] = Gate()
        return g

    def up(self, name: str) -> bool:
        return self.breaker(name).closed

    def open_circuits(self, upstreams: Sequence[UpstreamConfig]) -> list[str]:
        """Names of configured upstreams whose circuit is not closed (for /readyz)."""
        return [u.name for u in upstreams if not self.breaker(u.name).closed]

    def order(self, candidates: Sequence[UpstreamConfig], *, pinned: bool) -> list[UpstreamConfig]:
        """Priority groups in order; a weighted random order inside each (config order
        when pinned). `candidates` are already sorted by priority."""
        if pinned or len(candidates) < 2:
            return list(candidates)
        out: list[UpstreamConfig] = []
        for _, group in itertools.groupby(candidates, key=lambda u: u.priority):
            members = list(group)
            if len(members) > 1:
                # Efraimidis-Spirakis: a weighted permutation in one sort.
                keys = {u.name: self.rng.random() ** (1.0 / u.weight) for u in members}
                members.sort(key=lambda u: keys[u.name], reverse=True)
            out.extend(members)
        return out

    def record(self, upstream: UpstreamConfig, ok: bool) -> None:
        b = self.breaker(upstream.name)
        now = time.monotonic()
        if ok:
            if b.success():
                log.warning("upstream %s: circuit closed (probe succeeded)", upstream.name)
                self.metrics.upstream_up.labels(upstream.name).set(1)
            return
        cfg = upstream.circuit_breaker
        if b.failure(cfg.failures, cfg.cooldown_seconds, now):
            log.warning(
                "upstream %s: circuit opened after %d failure(s) in a row; probing again in %gs",
                upstream.name,
                b.failures,
                cfg.cooldown_seconds,
            )
            self.metrics.upstream_up.labels(upstream.name).set(0)


UPSTREAMS = web.AppKey("upstreams", UpstreamHealth)


# ------------------------------------------------------------------------ calls


@dataclass(slots=True)
class UpstreamCall:
    """The upstream that answered, and its response (not yet read)."""

    upstream: UpstreamConfig
    response: aiohttp.ClientResponse


def _counts_as_failure(status: int) -> bool:
    return status == 429 or status >= 500


async def _peek_429(resp: aiohttp.ClientResponse) -> tuple[bool, str]:
    """Is this 429 DashScope's `Throttling*`, and its code? Reads a small known-length body
    (aiohttp keeps it, so a relay after this still gets it); a body of unknown length is
    assumed to be: every 429 DashScope documents is `Throttling*`."""
    length = resp.content_length
    if length is None or length > _PEEK_LIMIT or "event-stream" in resp.content_type:
        return True, "429"
    try:
        obj = loads(await resp.read())
    except (ValueError, RecursionError, aiohttp.ClientError, TimeoutError):
        return True, "429"
    code = obj.get("code") if isinstance(obj, dict) else None
    if not isinstance(code, str) or not code:
        return True, "429"
    return code.startswith("Throttling"), code[:64]


@contextlib.asynccontextmanager
async def call_with_failover(
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
) -> AsyncIterator[UpstreamCall]:
    """Call the first candidate that takes the request, failing over as the module doc says.

    `path` is appended to the upstream's `base_url`; `headers(upstream)` builds the
    request headers for it (its key). `pinned`: config order, and no failover once a
    request was sent (uploads, `oss://` inputs). Raises `GatewayError` (502/503/504)
    when no candidate answers; a 429/503 from the last candidate is yielded as is,
    so the client sees DashScope's own answer.
    """
    if not candidates:
        raise _unavailable(1, "No upstream serves this request.")
    app = request.app
    health = app[UPSTREAMS]
    metrics = app[METRICS]
    session = app[SESSION]
    ctx = request.get(CTX)
    order = health.order(candidates, pinned=pinned)
    # (from_upstream, reason): counted as failovers once another upstream is tried.
    pending: list[tuple[str, str]] = []
    busy: list[UpstreamConfig] = []
    last_failure: UpstreamFailure | None = None
    soonest = math.inf

    async def attempt(u: UpstreamConfig, more: bool) -> UpstreamCall | str:
        """One try, the upstream's slot held: the call to yield, or a failover reason
        (the slot then released). Failures not worth another upstream are raised."""
        nonlocal last_failure
        gate = health.gate(u.name)
        breaker = health.breaker(u.name)
        if not breaker.begin(time.monotonic()):
            gate.leave()
            return "circuit_open"
        for name, reason in pending:
            metrics.upstream_failovers.labels(name, reason).inc()
        pending.clear()
        if ctx is not None:
            ctx.upstream = u.name
        try:
            resp = await call_upstream(
                session,
                metrics,
                u,
                endpoint,
                method,
                u.base_url + path,
                headers(u),
                body,
                params=params,
            )
        except UpstreamFailure as failure:
            health.record(u, ok=False)
            gate.leave()
            if more and failure.kind in RETRYABLE_KINDS:
                last_failure = failure
                return failure.kind
            raise
        except BaseException:
            breaker.abandon()
            gate.leave()
            raise
        health.record(u, ok=not _counts_as_failure(resp.status))
        if more and resp.status in (429, 503):
            try:
                throttled, code = (
                    await _peek_429(resp) if resp.status == 429 else (True, str(resp.status))
                )
            except BaseException:
                resp.release()
                gate.leave()
                raise
            if throttled:
                metrics.upstream_errors.labels(u.name, code).inc()
                resp.release()
                gate.leave()
                return "unavailable" if resp.status == 503 else "throttled"
        return UpstreamCall(u, resp)

    chosen: UpstreamCall | None = None
    for index, u in enumerate(order):
        now = time.monotonic()
        breaker = health.breaker(u.name)
        if not breaker.available(now):
            soonest = min(soonest, breaker.retry_in(now))
            pending.append((u.name, "circuit_open"))
            continue
        gate = health.gate(u.name)
        if pinned:
            # Pinned requests must land where their upload did: wait, never skip.
            if not await gate.enter(capacity(u), u.timeouts.connect):
                busy.append(u)
                break
        elif not gate.try_enter(capacity(u)):
            busy.append(u)
            pending.append((u.name, "busy"))
            continue
        more = not pinned and any(
            health.breaker(v.name).available(time.monotonic()) for v in order[index + 1 :]
        )
        outcome = await attempt(u, more or (not pinned and bool(busy)))
        if isinstance(outcome, UpstreamCall):
            chosen = outcome
            break
        if outcome == "circuit_open":  # another request took the probe meanwhile
            soonest = min(soonest, 1.0)
        pending.append((u.name, outcome))

    if chosen is None and busy and not pinned:
        # Every candidate was full, open or refused: wait for the preferred full one.
        u = busy[0]
        if await health.gate(u.name).enter(capacity(u), u.timeouts.connect):
            outcome = await attempt(u, False)
            if isinstance(outcome, UpstreamCall):
                chosen = outcome
    if chosen is None:
        if last_failure is not None:
            raise last_failure
        if busy:
            raise _unavailable(
                1,
                "Every DashScope upstream for this model is at its "
                "concurrency limit; retry shortly.",
            )
        raise _unavailable(
            soonest if soonest < math.inf else 1,
            "Every DashScope upstream for this model is unavailable right now "
            "(circuit open); retry shortly.",
        )
    try:
        yield chosen
    finally:
        chosen.response.release()
        health.gate(chosen.upstream.name).leave()


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
        raise _unavailable(
            max(breaker.retry_in(now), 1.0),
            "The DashScope upstream that holds this task is temporarily "
            "unavailable; retry shortly.",
        )
    if not await gate.enter(capacity(upstream), upstream.timeouts.connect):
        breaker.abandon()
        raise _unavailable(
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
        health.record(upstream, ok=not _counts_as_failure(resp.status))
        try:
            yield UpstreamCall(upstream, resp)
        finally:
            resp.release()
    finally:
        gate.leave()
