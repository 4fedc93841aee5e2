"""The Redis backend itself: the client, its health, the fallback, and reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster

from proxy.config.model import StateConfig
from proxy.metrics import Metrics
from proxy.state import Claim, owner_id
from proxy.state.local import LocalStore, SpoolRow, StateBackend
from proxy.state.redis.common import (
    FAILURES,
    PING_SECONDS,
    REFRESH_SECONDS,
    RETENTION_SECONDS,
    SCRIPT_NAMES,
    Keys,
    T,
    claim_of,
    claim_value,
    script_source,
)
from proxy.state.redis.connect import Connection, connect
from proxy.state.redis.idempotency import RedisIdempotency
from proxy.state.redis.limits import RedisLimiter
from proxy.state.redis.tasks import RedisTaskStore, put_call
from proxy.state.tasks import TERMINAL

log = logging.getLogger(__name__)

PUSH_BATCH = 200  # spooled rows handed to Redis per pipeline
PUSH_ROUNDS = 3  # extra pushes of what was spooled during the push, before Redis is used again


class RedisState(StateBackend):
    """Redis shared by replicas, with a local fallback while it is unreachable."""

    name = "redis"

    def __init__(self, connection: Connection, spool: LocalStore, metrics: Metrics) -> None:
        self.redis = client = connection.client
        self.keys = connection.keys
        self._connection = connection
        self.spool = spool
        self.metrics = metrics
        self._up = True
        self._down_since: float | None = None
        self.recovered_at = 0.0
        self.recovering = False
        self._background: set[asyncio.Future[None]] = set()
        self._closing = False
        self._reconciled = asyncio.Event()
        self.scripts = {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}
        self.redis_limiter = RedisLimiter(self)
        self.redis_tasks = RedisTaskStore(self)
        self.limiter = self.redis_limiter
        self.tasks = self.redis_tasks
        self.idempotency = RedisIdempotency(self)

    @classmethod
    async def open(cls, config: StateConfig, metrics: Metrics) -> RedisState:
        # One immediate retry, on a fresh connection, of a call that fails to connect or
        # loses its connection (`connect`): after a clean Redis restart every pooled
        # connection is dead, and each would otherwise fail once and mark Redis down (a
        # restart is not a partition). Nothing else is retried: a timeout has already
        # taken SOCKET_TIMEOUT, and a second failure falls back at once (the monitor
        # reconnects) instead of stalling requests for a backoff. A repeated call is
        # harmless: a claim or compare-and-set that did happen answers as if it just
        # did; only quota usage (INCRBY) may then be added twice.
        connection = connect(config)
        spool = LocalStore(config.path)
        await spool.open()
        state = cls(connection, spool, metrics)
        try:
            await state.ping()
            await state.reconcile()
        except FAILURES as exc:
            state.mark_down(exc)
        state.spawn(state._monitor())
        state.spawn(state._refresh_leases())
        return state

    async def ping(self) -> None:
        """One round trip to where the gateway's keys live (`Connection.ping`)."""
        await self._connection.ping()

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

    def spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        task: asyncio.Future[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _monitor(self) -> None:
        while not self._closing:
            await asyncio.sleep(PING_SECONDS)
            try:
                await self.ping()
                if not self._up or self.spool_pending:
                    self.recovering = not self._up
                    try:
                        await self.reconcile()
                    finally:
                        self.recovering = False
            except FAILURES as exc:
                self.mark_down(exc)
            except Exception:
                log.exception("redis monitor failed; retrying")

    @property
    def spool_pending(self) -> bool:
        tasks = self.redis_tasks
        return tasks.spooled or bool(tasks.unfinished) or self.redis_limiter.spooled

    async def reconcile(self) -> None:
        """Write what was kept locally to Redis, then use Redis again. Raises on failure.

        Requests keep spooling while the push runs (Redis is still marked down), and a
        task in this replica's spool is one other replicas cannot see: so the spool is
        pushed again (a few rounds) before Redis is used again, and what was spooled
        during the last round is pushed at once after, not a monitor tick later."""
        await self._push_spool()
        if not self._up:
            for _ in range(PUSH_ROUNDS):
                if not self.spool_pending:
                    break
                await self._push_spool()
            outage = time.time() - (self._down_since or time.time())
            log.warning("redis reachable again after %.0fs: local state reconciled", outage)
            self._up = True
            self._down_since = None
            self.recovered_at = time.monotonic()
            self.metrics.state_backend_up.set(1)
            if self.spool_pending:
                await self._push_spool()
        # Anything still spooled (a claim left unfinished) is retried on the next tick.

    async def _push_spool(self) -> None:
        await self.push_tasks()
        await self.redis_limiter.push_spool()

    # ------------------------------------------------------------- the handover

    async def push_tasks(self) -> None:
        """Tasks recorded or claimed here during an outage, handed to Redis.

        Batch by batch: the rows are marked handed in the spool (from then on no claim
        is won on them locally; a claim waits, then is made in Redis), written to Redis
        with the claims they carry (one script per row: a claim made here and the task
        become visible to other replicas together), then deleted here. What changed on
        a handed row meanwhile (its status, a pending claim marked done) is forwarded.
        """
        tasks = self.redis_tasks
        me = owner_id()
        pushed = 0
        while tasks.spooled:
            writes = tasks.spool_writes
            rows = await self.spool.hand_over(me, PUSH_BATCH)
            if not rows:
                if writes == tasks.spool_writes:  # nothing spooled meanwhile
                    tasks.spooled = False
                break
            ids = [row.record.task_id for row in rows]
            try:
                results = await self._adopt(rows)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.spool.release_handed(me, ids)
                raise
            after = {r.record.task_id: r for r in await self.spool.drop_handed(me, ids)}
            for i, (row, result) in enumerate(zip(rows, results, strict=True)):
                try:
                    await self._handed(row, after.get(row.record.task_id), result)
                except BaseException:
                    # The batch left the spool: rows not handled yet whose claim was
                    # counted meanwhile must still be marked done in Redis, later.
                    for rest in rows[i:]:
                        done, ours = after.get(rest.record.task_id), Claim.decode(rest.claim)
                        if rest.metered == 2 and done is not None and done.metered == 1 and ours:
                            tasks.unfinished[rest.record.task_id] = ours
                    raise
            pushed += len(rows)
        for task_id, claim in list(tasks.unfinished.items()):
            if not await self._finish(task_id, claim):
                log.warning(
                    "task %s was metered by this replica while redis was unreachable, and "
                    "its claim finished by another process meanwhile: its images may be "
                    "counted twice",
                    task_id,
                )
            del tasks.unfinished[task_id]
        if pushed:
            log.warning("redis: wrote %d task(s) recorded locally during the outage", pushed)

    async def _adopt(self, rows: list[SpoolRow]) -> list[Any]:
        script = self.scripts["adopt"]
        calls = [adopt_call(self.keys, row) for row in rows]
        if isinstance(self.redis, RedisCluster):
            # A cluster pipeline refuses scripts: one call per row, in order (each may
            # fail and be retried by the next push: adopting a row twice is harmless).
            return [await script(keys=k, args=a) for k, a in calls]
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=cast(Any, pipe))
            return list(await pipe.execute())

    async def _handed(self, row: SpoolRow, after: SpoolRow | None, result: list[Any]) -> None:
        task_id = row.record.task_id
        ours = Claim.decode(row.claim)
        other = Claim.decode(claim_of(str(result[1]))[1]) if int(result[0]) == 0 else None
        if other is not None and ours is not None and other.owner == ours.owner:
            # This process's own claim, made in Redis as it went away (the reply lost):
            # never counted, so the one counted here replaces it.
            pending = row.metered == 2 and (after is None or after.metered == 2)
            value = claim_value(row.claim, pending=pending)
            at = repr(ours.at) if pending else ""
            args: list[str | int] = [str(result[1]), value, RETENTION_SECONDS, task_id, at]
            await self.scripts["cas"](keys=self.keys.claim(task_id), args=args)
            result = [1]
        if int(result[0]) == 0 and row.claim is not None:
            # Counted here during the outage, and claimed in Redis by another replica
            # first (only in a partition: this replica read the task just before losing
            # Redis, the other counted it meanwhile). A claim copied from Redis never
            # gets here: it is not `row.claim`.
            log.warning(
                "task %s was metered by this replica during the redis outage and by %s "
                "too: its images are counted twice",
                task_id,
                "another replica" if other is None else other.owner,
            )
            self.metrics.metering_doubles.inc()
        if after is None:
            return
        if after.record.status != row.record.status:
            final = "1" if after.record.status in TERMINAL else "0"
            await self.scripts["set_status"](
                keys=[self.keys.task(task_id), self.keys.reconcile],
                args=[after.record.status, final, task_id],
            )
        if row.metered == 2 and after.metered == 1 and ours is not None and int(result[0]):
            # Counted while being handed over: marked done by the `unfinished` pass after
            # the batch, which is retried until it succeeds (a failure here loses nothing).
            self.redis_tasks.unfinished[task_id] = ours
        self.redis_tasks.remember(after.record)

    async def _finish(self, task_id: str, claim: Claim) -> bool:
        text = claim.encode()
        pending, done = claim_value(text, pending=True), claim_value(text, pending=False)
        args: list[str | int] = [pending, done, RETENTION_SECONDS, task_id, ""]
        return int(await self.scripts["cas"](keys=self.keys.claim(task_id), args=args)) == 1

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
            await self._connection.close()
        await self.spool.close()


def adopt_call(keys: Keys, row: SpoolRow) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the `adopt` script for a spooled row: its claim goes along only if
    it was made here (`metered` 1 or 2), pending or done as it is now."""
    rec = row.record
    names, args = put_call(keys, rec)
    value = ""
    at = ""
    if row.metered in (1, 2):
        value = claim_value(row.claim, pending=row.metered == 2)
        claim = Claim.decode(row.claim) if row.metered == 2 else None
        at = "" if claim is None else repr(claim.at)
    final = "1" if rec.status in TERMINAL or row.metered else "0"
    return [*names, *keys.claim(rec.task_id)], [*args[:4], rec.status, final, value, at, *args[4:]]
