"""The Redis backend itself: the client, its health, the fallback, and reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.config.model import StateConfig
from proxy.metrics import Metrics
from proxy.state.local import LocalStore, StateBackend
from proxy.state.redis.common import (
    FAILURES,
    PING_SECONDS,
    POOL_SIZE,
    POOL_WAIT,
    REFRESH_SECONDS,
    SCRIPT_NAMES,
    SOCKET_TIMEOUT,
    T,
    script_source,
)
from proxy.state.redis.limits import RedisLimiter
from proxy.state.redis.tasks import RedisTaskStore

log = logging.getLogger(__name__)


class RedisState(StateBackend):
    """Redis shared by replicas, with a local fallback while it is unreachable."""

    name = "redis"

    def __init__(
        self, client: Redis, pool: BlockingConnectionPool, spool: LocalStore, metrics: Metrics
    ) -> None:
        self.redis = client
        self._pool = pool
        self.spool = spool
        self.metrics = metrics
        self._up = True
        self._down_since: float | None = None
        self.recovered_at = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self._reconciled = asyncio.Event()
        self.scripts = {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}
        self.redis_limiter = RedisLimiter(self)
        self.redis_tasks = RedisTaskStore(self)
        self.limiter = self.redis_limiter
        self.tasks = self.redis_tasks

    @classmethod
    async def open(cls, config: StateConfig, metrics: Metrics) -> RedisState:
        assert config.url is not None  # config validation requires it
        # No retries inside redis-py: a failed call falls back at once (the
        # monitor reconnects), instead of stalling requests for its backoff.
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            **managed_redis_options(config),
        )
        client = Redis(connection_pool=pool)
        spool = LocalStore(config.path)
        await spool.open()
        state = cls(client, pool, spool, metrics)
        try:
            await client.ping()
            await state.reconcile()
        except FAILURES as exc:
            state.mark_down(exc)
        state.spawn(state._monitor())
        state.spawn(state._refresh_leases())
        return state

    # ---------------------------------------------------------------- health

    @property
    def up(self) -> bool:
        return self._up

    def problems(self) -> list[str]:
        if self._up or self._down_since is None:
            return []
        return [
            f"state backend redis unreachable for {time.time() - self._down_since:.0f}s: "
            "limits are enforced per replica, tasks submitted here are kept locally until "
            "it returns, polls of other tasks answer 503"
        ]

    def mark_down(self, exc: BaseException) -> None:
        if self._up:
            log.error("redis unreachable (%s): serving from the local fallback", type(exc).__name__)
            self._up = False
            self._down_since = time.time()
            self.metrics.state_backend_up.set(0)

    def fallback(self, operation: str) -> None:
        self.metrics.state_fallbacks.labels(operation).inc()

    async def call(self, op: Callable[[], Awaitable[T]]) -> T | None:
        """Run a Redis operation if Redis is up; None (and down) if it fails."""
        if not self._up:
            return None
        try:
            return await op()
        except FAILURES as exc:
            self.mark_down(exc)
            return None

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _monitor(self) -> None:
        while not self._closing:
            await asyncio.sleep(PING_SECONDS)
            try:
                await self.redis.ping()
                if not self._up or self.spool_pending:
                    await self.reconcile()
            except FAILURES as exc:
                self.mark_down(exc)
            except Exception:
                log.exception("redis monitor failed; retrying")

    @property
    def spool_pending(self) -> bool:
        return self.redis_tasks.spooled or self.redis_limiter.spooled

    async def reconcile(self) -> None:
        """Write what was kept locally to Redis, then use Redis again. Raises on failure."""
        await self.redis_tasks.push_spool()
        await self.redis_limiter.push_spool()
        if not self._up:
            outage = time.time() - (self._down_since or time.time())
            log.warning("redis reachable again after %.0fs: local state reconciled", outage)
            self._up = True
            self._down_since = None
            self.recovered_at = time.monotonic()
            self.metrics.state_backend_up.set(1)
        # Rows spooled while we pushed are picked up on the next monitor tick.

    async def _refresh_leases(self) -> None:
        while not self._closing:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.redis_limiter.refresh()
            except FAILURES as exc:
                self.mark_down(exc)
            except Exception:
                log.exception("lease refresh failed")

    async def close(self) -> None:
        self._closing = True
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(*FAILURES):
            await self.redis.aclose()
        with contextlib.suppress(*FAILURES):
            await self._pool.aclose()
        await self.spool.close()


# ----------------------------------------------------------------------- limits


def managed_redis_options(config: StateConfig) -> dict[str, str]:
    """Pure: connection options for managed Redis: `state.password` (used when the URL
    carries none; any characters, so a Secret needs no URL-encoding) and, for a
    `rediss://` URL, `state.tls_ca_file` (the CA of a private certificate; without it the
    system's trusted CAs verify the server)."""
    options: dict[str, str] = {}
    if config.password:
        options["password"] = config.password
    if config.tls_ca_file and (config.url or "").startswith("rediss://"):
        options["ssl_ca_certs"] = config.tls_ca_file
    return options
