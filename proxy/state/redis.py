"""`state.backend: redis`: task ownership, metering claims and limit counters shared by replicas.

What lives in Redis (keys under `dsp:`, one logical database per deployment):
- `dsp:task:<id>` (hash) and `dsp:tasks:<key>` (sorted set by creation time):
  who created which task on which upstream; kept 48 h like the SQLite store.
- `dsp:metered:<id>`: the once-per-task metering claim, `SET NX`: exactly one
  replica counts a task's images, whichever replica the poll reaches.
- `dsp:rpm:<key>` (admission times), `dsp:conc:<key>` (in-flight leases),
  `dsp:resv:<key>` + `dsp:resvn:<key>` (image reservations) and
  `dsp:used:<key>:d:<YYYYMMDD>` / `:m:<YYYYMM>` (images used, UTC): per-key
  limits. Admission is one Lua script (check every limit, then record), so
  concurrent requests on several replicas cannot both take the last slot.
  Times inside scripts are Redis's own clock (`TIME`), not the replicas'.
  Concurrency leases and request reservations expire `LEASE_SECONDS` after
  their last refresh (every `REFRESH_SECONDS`, by the replica holding them),
  so a replica that dies frees its slots within half a minute.

When Redis is unreachable (a command fails or times out after
`SOCKET_TIMEOUT` s), the replica marks it down, serves from its fallback, and
a monitor pings every `PING_SECONDS` s; when Redis answers again the replica
reconciles, then uses it again:
- limits: per-replica in-process counters (fail open to N replicas x the
  limit), seeded with the image usage last read from Redis. Image usage
  recorded meanwhile is spooled in the local SQLite file and added to Redis
  on recovery, so no usage is lost, even across a restart of the replica.
- tasks submitted during the outage: recorded in the local SQLite file and
  written to Redis on recovery. Polls of tasks this replica does not hold
  answer 503 with Retry-After (the DashScope SDKs and the gateway's OpenAI
  path retry 503 polls), never UNKNOWN, so no client gives up on a task
  that exists; so do unknown ids for `RECOVERY_GRACE_SECONDS` after Redis
  returns, while other replicas write back what they recorded.
- a poll that reads a task from Redis and loses Redis before claiming its
  metering counts the images locally and writes the claim on recovery; if
  another replica claimed it meanwhile (only possible in a network
  partition) the images were counted twice, which is logged.
Reconciliation is at-least-once per spooled row; Redis itself should persist
(AOF or RDB), or a Redis restart forgets task ownership and quotas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config import LimitsConfig, StateConfig
from proxy.core.limits import (
    CONCURRENCY,
    IMAGES_DAY,
    IMAGES_MONTH,
    RPM,
    TASK_HOLD_SECONDS,
    WINDOW_SECONDS,
    Decision,
    LocalLimiter,
    decide,
    has_quota,
)
from proxy.errors import GatewayError
from proxy.metrics import Metrics
from proxy.state.local import LocalStore, StateBackend, current_periods
from proxy.state.tasks import TERMINAL, SqliteTaskStore, TaskRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

SOCKET_TIMEOUT = 1.0  # a Redis call slower than this counts as Redis being down
POOL_SIZE = 128  # connections per replica; waiting for one is bounded by POOL_WAIT
POOL_WAIT = 2.0
PING_SECONDS = 1.0
LEASE_SECONDS = 30.0
REFRESH_SECONDS = 10.0
# After Redis returns, unknown task ids still answer 503 this long: another replica may not
# have written back the tasks it recorded during the outage yet (it pings every second).
RECOVERY_GRACE_SECONDS = 5.0
RETENTION_SECONDS = SqliteTaskStore.RETENTION_SECONDS
DAY_TTL = 3 * 86400
MONTH_TTL = 40 * 86400
_FAILURES = (RedisError, OSError, TimeoutError)
_LIMIT_CODES = {1: RPM, 2: CONCURRENCY, 3: IMAGES_DAY, 4: IMAGES_MONTH}

# KEYS: rpm, conc, resv, resvn, used_d, used_m
# ARGV: rpm_limit, conc_limit, day_limit, month_limit (-1: none), images, token,
#       lease_ms, window_ms, hold_ms
# -> {code (0 admitted, else _LIMIT_CODES), now_ms, recent, oldest_ms, inflight,
#     used_d, used_m, reserved}
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm_limit, conc_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local day_limit, month_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local images, token = tonumber(ARGV[5]), ARGV[6]
local lease, window, hold = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('HDEL', KEYS[4], unpack(expired))
end
local recent = redis.call('ZCARD', KEYS[1])
local oldest = -1
if recent > 0 then oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) end
local inflight = redis.call('ZCARD', KEYS[2])
local used_d = tonumber(redis.call('GET', KEYS[5]) or '0')
local used_m = tonumber(redis.call('GET', KEYS[6]) or '0')
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[4])) do reserved = reserved + tonumber(v) end
local code = 0
if rpm_limit >= 0 and recent >= rpm_limit then code = 1
elseif conc_limit >= 0 and inflight >= conc_limit then code = 2
elseif day_limit >= 0 and used_d + reserved + images > day_limit then code = 3
elseif month_limit >= 0 and used_m + reserved + images > month_limit then code = 4
end
if code == 0 then
  if rpm_limit >= 0 then
    redis.call('ZADD', KEYS[1], now, token)
    redis.call('PEXPIRE', KEYS[1], window)
  end
  redis.call('ZADD', KEYS[2], now + lease, token)
  redis.call('PEXPIRE', KEYS[2], lease)
  if images > 0 and (day_limit >= 0 or month_limit >= 0) then
    redis.call('ZADD', KEYS[3], now + lease, token)
    redis.call('HSET', KEYS[4], token, images)
    redis.call('PEXPIRE', KEYS[3], hold)
    redis.call('PEXPIRE', KEYS[4], hold)
  end
end
return {code, now, recent, oldest, inflight, used_d, used_m, reserved}
"""

# KEYS: conc, resv, resvn   ARGV: tokens...
_RELEASE = """
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
return 1
"""

# KEYS: conc, resv   ARGV: lease_ms, tokens...  (extend leases still present)
_REFRESH = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS: resv, resvn   ARGV: token, task_token, hold_ms
_HOLD = """
local n = redis.call('HGET', KEYS[2], ARGV[1])
if not n then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], n)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# KEYS: used_d, used_m, resv, resvn   ARGV: images, day_ttl, month_ttl, tokens...
_USAGE = """
local d = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local m = redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
for i = 4, #ARGV do
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
return {d, m}
"""

# KEYS: task, index, reconcile   ARGV: task_id, created_at, ttl, next_check ('' = none),
# field, value, ...
_PUT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
local created = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], created, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', created - tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1]) end
return 1
"""

# KEYS: task, reconcile   ARGV: status, final (1: no more background polls), task_id
_SET_STATUS = """
if ARGV[2] == '1' then redis.call('ZREM', KEYS[2], ARGV[3]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
"""

# KEYS: reconcile   ARGV: now, limit, lease_until
_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"""
RECONCILE_KEY = "dsp:reconcile"

# KEYS: task, claim   ARGV: ttl
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 1 end
return 0
"""


def _keys(key: str) -> tuple[str, str, str, str]:
    return f"dsp:rpm:{key}", f"dsp:conc:{key}", f"dsp:resv:{key}", f"dsp:resvn:{key}"


def _used_keys(key: str, now: float) -> tuple[str, str]:
    day, month = current_periods(now)
    return f"dsp:used:{key}:{day}", f"dsp:used:{key}:{month}"


def state_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "ServiceUnavailable",
        "Task state is temporarily unavailable (the gateway's shared state store "
        "cannot be reached); please retry shortly.",
        openai_type="server_error",
        openai_code="state_unavailable",
        retry_after=2,
    )


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


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
        self.scripts = {
            name: client.register_script(src)
            for name, src in (
                ("admit", _ADMIT),
                ("release", _RELEASE),
                ("refresh", _REFRESH),
                ("hold", _HOLD),
                ("usage", _USAGE),
                ("put", _PUT),
                ("set_status", _SET_STATUS),
                ("claim", _CLAIM),
                ("due", _DUE),
            )
        }
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
        )
        client = Redis(connection_pool=pool)
        spool = LocalStore(config.path)
        await spool.open()
        state = cls(client, pool, spool, metrics)
        try:
            await client.ping()
            await state.reconcile()
        except _FAILURES as exc:
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
        except _FAILURES as exc:
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
            except _FAILURES as exc:
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
            except _FAILURES as exc:
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
        with contextlib.suppress(*_FAILURES):
            await self.redis.aclose()
        with contextlib.suppress(*_FAILURES):
            await self._pool.aclose()
        await self.spool.close()


# ----------------------------------------------------------------------- limits


class RedisLimiter:
    """Limits in Redis; in-process counters (`LocalLimiter`) while Redis is down."""

    def __init__(self, state: RedisState) -> None:
        self._s = state
        self.local = LocalLimiter()
        # Tokens admitted through Redis and still in flight: token -> key.
        self._held: dict[str, str] = {}
        # Tokens admitted by the local fallback (released locally).
        self._local_tokens: set[str] = set()
        # Releases that failed while Redis was down: (key, token).
        self._orphans: set[tuple[str, str]] = set()
        self.spooled = False

    async def admit(
        self, key: str, limits: LimitsConfig, token: str, images: int, now: float
    ) -> Decision:
        def arg(v: int | None) -> int:
            return -1 if v is None else v

        reserve = images if has_quota(limits) else 0
        script = self._s.scripts["admit"]
        result = await self._s.call(
            lambda: script(
                keys=[*_keys(key), *_used_keys(key, now)],
                args=[
                    arg(limits.requests_per_minute),
                    arg(limits.concurrent_requests),
                    arg(limits.images_per_day),
                    arg(limits.images_per_month),
                    reserve,
                    token,
                    _ms(LEASE_SECONDS),
                    _ms(WINDOW_SECONDS),
                    _ms(TASK_HOLD_SECONDS),
                ],
            )
        )
        if result is None:
            self._s.fallback("limits")
            decision = self.local.admit_now(key, limits, token, reserve, now)
            if decision.allowed:
                self._local_tokens.add(token)
            return decision
        code, now_ms, recent, oldest, inflight, used_d, used_m, reserved = (int(x) for x in result)
        self._seed(key, now, used_d, used_m)
        if code == 0:
            self._held[token] = key
            return Decision(True, used_day=used_d, used_month=used_m, reserved=reserved)
        decision = decide(
            limits,
            now=now_ms / 1000,
            recent=recent,
            oldest=oldest / 1000 if oldest >= 0 else None,
            inflight=inflight,
            used_day=used_d,
            used_month=used_m,
            reserved=reserved,
            images=reserve,
        )
        if decision.allowed:  # the script and `decide` disagree only at an exact boundary
            decision = Decision(False, _LIMIT_CODES[code], 1, used_d, used_m, reserved)
        return decision

    def _seed(self, key: str, now: float, used_d: int, used_m: int) -> None:
        day, month = current_periods(now)
        self.local.used[(key, day)] = used_d
        self.local.used[(key, month)] = used_m

    def release(self, key: str, token: str) -> None:
        if token in self._local_tokens:
            self._local_tokens.discard(token)
            self.local.release(key, token)
            return
        if self._held.pop(token, None) is None:
            return
        self._s.spawn(self._release_remote(key, [token]))

    async def _release_remote(self, key: str, tokens: list[str]) -> None:
        conc, resv, resvn = _keys(key)[1:]
        script = self._s.scripts["release"]
        done = await self._s.call(lambda: script(keys=[conc, resv, resvn], args=tokens))
        if done is None:
            self._orphans.update((key, t) for t in tokens)

    async def hold_for_task(self, key: str, token: str, task_id: str, now: float) -> None:
        if token in self._local_tokens:
            self.local.hold_now(key, token, task_id, now)
            return
        _, _, resv, resvn = _keys(key)
        script = self._s.scripts["hold"]
        await self._s.call(
            lambda: script(keys=[resv, resvn], args=[token, "t:" + task_id, _ms(TASK_HOLD_SECONDS)])
        )

    async def settle_task(self, key: str, task_id: str) -> None:
        await self.local.settle_task(key, task_id)
        conc, resv, resvn = _keys(key)[1:]
        script = self._s.scripts["release"]
        await self._s.call(lambda: script(keys=[conc, resv, resvn], args=["t:" + task_id]))

    async def record_usage(
        self, key: str, images: int, tokens: Iterable[str], now: float
    ) -> tuple[int, int]:
        toks = list(tokens)
        _, _, resv, resvn = _keys(key)
        script = self._s.scripts["usage"]
        result = await self._s.call(
            lambda: script(
                keys=[*_used_keys(key, now), resv, resvn], args=[images, DAY_TTL, MONTH_TTL, *toks]
            )
        )
        if result is not None:
            used_d, used_m = (int(x) for x in result)
            self._seed(key, now, used_d, used_m)
            self.local.add_usage(key, 0, toks, now)
            return used_d, used_m
        # Redis down: count locally (on top of the last known totals) and spool it.
        self._s.fallback("usage")
        used = self.local.add_usage(key, images, toks, now)
        await self._s.spool.add_usage(key, images, current_periods(now))
        self.spooled = True
        return used

    async def usage(self, key: str, now: float) -> tuple[int, int]:
        keys = _used_keys(key, now)
        values = await self._s.call(lambda: self._s.redis.mget(keys))
        if values is None:
            return self.local.used_now(key, now)
        used_d, used_m = (int(v) if v else 0 for v in values)
        self._seed(key, now, used_d, used_m)
        return used_d, used_m

    async def refresh(self) -> None:
        """Extend the leases of requests this replica still has in flight."""
        if not self._s.up or not self._held:
            return
        by_key: dict[str, list[str]] = {}
        for token, key in self._held.items():
            by_key.setdefault(key, []).append(token)
        script = self._s.scripts["refresh"]
        for key, tokens in by_key.items():
            conc, resv = _keys(key)[1:3]
            await script(keys=[conc, resv], args=[_ms(LEASE_SECONDS), *tokens])

    async def push_spool(self) -> None:
        """Usage and releases recorded while Redis was down, written to Redis."""
        if self._orphans:
            by_key: dict[str, list[str]] = {}
            for key, token in self._orphans:
                by_key.setdefault(key, []).append(token)
            script = self._s.scripts["release"]
            for key, tokens in by_key.items():
                conc, resv, resvn = _keys(key)[1:]
                await script(keys=[conc, resv, resvn], args=tokens)
            self._orphans.clear()
        rows = await self._s.spool.drain_usage()
        sent = 0
        try:
            for key, period, images in rows:
                ttl = DAY_TTL if period.startswith("d:") else MONTH_TTL
                name = f"dsp:used:{key}:{period}"
                async with self._s.redis.pipeline(transaction=True) as pipe:
                    pipe.incrby(name, images)
                    pipe.expire(name, ttl)
                    await pipe.execute()
                sent += 1
        finally:
            for key, period, images in rows[sent:]:  # keep what was not sent
                await self._s.spool.add_usage(key, images, [period])
        if rows:
            log.warning("redis: added %d spooled usage row(s) from the outage", len(rows))
        self.spooled = False


# ------------------------------------------------------------------------ tasks


class RedisTaskStore:
    """`TaskStore` on Redis; the local SQLite file holds what was created during an outage."""

    _RECENT_MAX = 1024

    def __init__(self, state: RedisState) -> None:
        self._s = state
        self.spooled = True  # check the spool once at startup (and after each outage)
        # Records read recently: a claim whose Redis call fails can still be spooled.
        self._recent: OrderedDict[str, TaskRecord] = OrderedDict()

    def _remember(self, record: TaskRecord) -> None:
        self._recent[record.task_id] = record
        self._recent.move_to_end(record.task_id)
        while len(self._recent) > self._RECENT_MAX:
            self._recent.popitem(last=False)

    async def put(self, record: TaskRecord) -> None:
        script = self._s.scripts["put"]
        keys, args = _put_call(record)
        done = await self._s.call(lambda: script(keys=keys, args=args))
        if done is None:
            self._s.fallback("tasks")
            await self._s.spool.put(record)
            self.spooled = True
        else:
            self._remember(record)

    async def _read(self, task_id: str) -> TaskRecord | None:
        async with self._s.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"dsp:task:{task_id}")
            pipe.exists(f"dsp:metered:{task_id}")
            fields, metered = await pipe.execute()
        return _record(task_id, fields, bool(metered))

    async def get(self, task_id: str) -> TaskRecord | None:
        if self._s.up:
            try:
                record = await self._read(task_id)
            except _FAILURES as exc:
                self._s.mark_down(exc)
            else:
                if record is None and self.spooled:
                    record = await self._s.spool.get(task_id)
                if record is not None:
                    self._remember(record)
                elif time.monotonic() - self._s.recovered_at < RECOVERY_GRACE_SECONDS:
                    raise state_unavailable()  # maybe not written back by its replica yet
                return record
        self._s.fallback("tasks")
        record = await self._s.spool.get(task_id)
        if record is None:
            # Maybe another replica's task: never answer UNKNOWN for it.
            raise state_unavailable()
        return record

    async def set_status(self, task_id: str, status: str) -> None:
        script = self._s.scripts["set_status"]
        final = "1" if status in TERMINAL else "0"
        done = await self._s.call(
            lambda: script(
                keys=[f"dsp:task:{task_id}", RECONCILE_KEY], args=[status, final, task_id]
            )
        )
        if done is None or (done == 0 and self.spooled):
            await self._s.spool.set_status(task_id, status)
        recent = self._recent.get(task_id)
        if recent is not None:
            self._recent[task_id] = _with_status(recent, status)

    async def claim_metering(self, task_id: str) -> bool:
        script = self._s.scripts["claim"]
        won = await self._s.call(
            lambda: script(
                keys=[f"dsp:task:{task_id}", f"dsp:metered:{task_id}"], args=[RETENTION_SECONDS]
            )
        )
        if won is not None and (won == 1 or not self.spooled):
            return bool(won == 1)
        if won is None:
            self._s.fallback("tasks")
            # Read from Redis a moment ago: claim it locally, written back on recovery.
            recent = self._recent.get(task_id)
            if recent is not None and await self._s.spool.get(task_id) is None:
                await self._s.spool.put(recent)
                self.spooled = True
        return await self._s.spool.claim_metering(task_id)

    async def due(self, now: float, limit: int, lease: float) -> list[TaskRecord]:
        if self._s.up:
            try:
                ids = await self._s.scripts["due"](
                    keys=[RECONCILE_KEY], args=[repr(now), limit, repr(now + lease)]
                )
                ids = [str(i) for i in ids]
                records = await self._fetch(ids, metered=True)
                gone = [t for t, r in zip(ids, records, strict=True) if r is None]
                if gone:  # expired (DashScope forgot it long ago): stop looking
                    await self._s.redis.zrem(RECONCILE_KEY, *gone)
                found = [r for r in records if r is not None]
                if self.spooled:
                    found += await self._s.spool.due(now, limit, lease)
                return found
            except _FAILURES as exc:
                self._s.mark_down(exc)
        self._s.fallback("tasks")
        return await self._s.spool.due(now, limit, lease)

    async def reschedule(self, task_id: str, at: float) -> None:
        done = await self._s.call(lambda: self._s.redis.zadd(RECONCILE_KEY, {task_id: at}, xx=True))
        if done is None or self.spooled:
            await self._s.spool.reschedule(task_id, at)

    async def count_due(self, now: float) -> int:
        count = await self._s.call(lambda: self._s.redis.zcount(RECONCILE_KEY, "-inf", now))
        if count is None:
            return await self._s.spool.count_due(now)
        return int(count)

    async def list_for_key(
        self,
        key: str,
        *,
        offset: int,
        limit: int,
        model: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> tuple[list[TaskRecord], int]:
        if self._s.up:
            try:
                return await self._list(key, offset, limit, model, status, since, until)
            except _FAILURES as exc:
                self._s.mark_down(exc)
        self._s.fallback("tasks")
        return await self._s.spool.list_for_key(
            key, offset=offset, limit=limit, model=model, status=status, since=since, until=until
        )

    async def _list(
        self,
        key: str,
        offset: int,
        limit: int,
        model: str | None,
        status: str | None,
        since: float | None,
        until: float | None,
    ) -> tuple[list[TaskRecord], int]:
        index = f"dsp:tasks:{key}"
        lo: float | str = since if since is not None else "-inf"
        hi: float | str = until if until is not None else "+inf"
        r = self._s.redis
        if model is None and status is None:
            total = int(await r.zcount(index, lo, hi))
            ids = await r.zrevrangebyscore(index, hi, lo, start=offset, num=limit)
            found = await self._fetch([str(i) for i in ids])
            return [rec for rec in found if rec is not None], total
        matched: list[TaskRecord] = []
        total = start = 0
        while True:  # filtered: scan the key's index in pages
            ids = await r.zrevrangebyscore(index, hi, lo, start=start, num=500)
            if not ids:
                break
            start += len(ids)
            for rec in await self._fetch([str(i) for i in ids]):
                if (
                    rec is None
                    or (model is not None and rec.model != model)
                    or (status is not None and rec.status != status)
                ):
                    continue
                if offset <= total < offset + limit:
                    matched.append(rec)
                total += 1
        return matched, total

    async def _fetch(self, ids: list[str], *, metered: bool = False) -> list[TaskRecord | None]:
        """The records of `ids` (None where gone); `metered`: read the claims too."""
        if not ids:
            return []
        async with self._s.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(f"dsp:task:{task_id}")
                if metered:
                    pipe.exists(f"dsp:metered:{task_id}")
            rows = await pipe.execute()
        if not metered:
            return [_record(t, f, False) for t, f in zip(ids, rows, strict=True)]
        return [_record(t, rows[2 * i], bool(rows[2 * i + 1])) for i, t in enumerate(ids)]

    async def close(self) -> None:
        """Closed with its `RedisState`."""

    async def push_spool(self) -> None:
        """Tasks recorded locally during an outage, written to Redis (then deleted here)."""
        if not self.spooled:
            return
        put = self._s.scripts["put"]
        claim = self._s.scripts["claim"]
        set_status = self._s.scripts["set_status"]
        pushed = 0
        while True:
            records = await self._s.spool.all_tasks(500)
            if not records:
                break
            for rec in records:
                task_key = f"dsp:task:{rec.task_id}"
                keys, args = _put_call(rec)
                created = await put(keys=keys, args=args)
                if not created:
                    final = "1" if rec.status in TERMINAL else "0"
                    await set_status(
                        keys=[task_key, RECONCILE_KEY], args=[rec.status, final, rec.task_id]
                    )
                if rec.metered and not await claim(
                    keys=[task_key, f"dsp:metered:{rec.task_id}"], args=[RETENTION_SECONDS]
                ):
                    log.warning(
                        "task %s was metered by this replica during the redis outage "
                        "and by another one too: its images are counted twice",
                        rec.task_id,
                    )
            await self._s.spool.delete_tasks(r.task_id for r in records)
            pushed += len(records)
        if pushed:
            log.warning("redis: wrote %d task(s) recorded locally during the outage", pushed)
        self.spooled = False


def _put_call(record: TaskRecord) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the `put` script for `record` (one field list for every caller)."""
    fields: list[Any] = [
        "key",
        record.key,
        "model",
        record.model,
        "upstream",
        record.upstream,
        "route",
        record.route,
        "created_at",
        repr(record.created_at),
        "status",
        record.status,
    ]
    if record.meta is not None:
        fields += ["meta", record.meta]
    final = record.status in TERMINAL or record.metered
    check = record.created_at if record.next_check is None else record.next_check
    next_check = "" if final else repr(check)
    keys = [f"dsp:task:{record.task_id}", f"dsp:tasks:{record.key}", RECONCILE_KEY]
    return keys, [record.task_id, repr(record.created_at), RETENTION_SECONDS, next_check, *fields]


def _record(task_id: str, fields: dict[str, str], metered: bool) -> TaskRecord | None:
    if not fields or "key" not in fields:
        return None
    try:
        created = float(fields.get("created_at", "0"))
    except ValueError:
        created = 0.0
    if not math.isfinite(created):
        created = 0.0
    return TaskRecord(
        task_id,
        fields["key"],
        fields.get("model", ""),
        fields.get("upstream", ""),
        fields.get("route", ""),
        created,
        fields.get("status", "PENDING"),
        metered,
        fields.get("meta"),
    )


def _with_status(record: TaskRecord, status: str) -> TaskRecord:
    return replace(record, status=status)
