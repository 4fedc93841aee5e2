"""Upstream health: circuit breakers, concurrency gates, and their registry.

State machines, no I/O (table-tested): `Breaker` (closed -> open after N failures in
a row -> one probe after a cooldown), `Gate` (a process's in-flight requests to one
upstream, with FIFO waiters), `UpstreamHealth` (both per upstream name, so they survive
config reloads; it keeps `dashscope_proxy_upstream_up` true and orders candidates by
priority and weight). `proxy.upstream.failover` drives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Sequence

from aiohttp import web

from proxy.config.model import UpstreamConfig
from proxy.metrics import Metrics

log = logging.getLogger(__name__)


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


class UpstreamHealth:
    """Breakers and gates of every upstream (by name, so they survive config reloads)."""

    def __init__(self, metrics: Metrics, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._breakers: dict[str, Breaker] = {}
        self._gates: dict[str, Gate] = {}
        self._key_rejected: set[str] = set()  # DashScope refused the upstream's own key

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
        return self.breaker(name).closed and name not in self._key_rejected

    def key_rejected(self, name: str) -> None:
        """DashScope refused this upstream's key (an answer, or a probe): down until an
        answer or a probe shows the key works again."""
        if name not in self._key_rejected:
            log.error("upstream %s: DashScope rejected its API key; taking it out", name)
            self._key_rejected.add(name)
        self.metrics.upstream_up.labels(name).set(0)

    def key_accepted(self, name: str) -> None:
        if name in self._key_rejected:
            log.warning("upstream %s: DashScope accepts its API key again", name)
            self._key_rejected.discard(name)
            self.metrics.upstream_up.labels(name).set(1 if self.breaker(name).closed else 0)

    def rejected_keys(self, upstreams: Sequence[UpstreamConfig]) -> list[str]:
        """Names of configured upstreams whose key DashScope refused (for /readyz)."""
        return [u.name for u in upstreams if u.name in self._key_rejected]

    def open_circuits(self, upstreams: Sequence[UpstreamConfig]) -> list[str]:
        """Names of configured upstreams whose circuit is not closed (for /readyz)."""
        return [u.name for u in upstreams if not self.breaker(u.name).closed]

    def order(
        self, candidates: Sequence[UpstreamConfig], *, pinned: bool
    ) -> Sequence[UpstreamConfig]:
        """Priority groups in order; a weighted random order inside each (config order
        when pinned: `candidates` themselves, already sorted by priority, not a copy)."""
        if pinned or len(candidates) < 2:
            return candidates
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
                if upstream.name not in self._key_rejected:
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
