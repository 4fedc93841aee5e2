"""Per-key limits on Redis: admission, leases, reservations and image usage (Lua)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from proxy.config.model import LimitsConfig
from proxy.state.limiter import (
    TASK_HOLD_SECONDS,
    WINDOW_SECONDS,
    Decision,
    LocalLimiter,
    current_periods,
    decide,
    has_quota,
)
from proxy.state.redis.common import DAY_TTL, LEASE_SECONDS, LIMIT_CODES, MONTH_TTL, Backend

log = logging.getLogger(__name__)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisLimiter:
    """Limits in Redis; in-process counters (`LocalLimiter`) while Redis is down."""

    def __init__(self, state: Backend) -> None:
        self._s = state
        self.local = LocalLimiter()
        # (key, token) admitted through Redis and still in flight. By key and token: a
        # request under an image quota and a spend limit holds one token under two keys
        # (the key and its spend key), each leased, refreshed and released on its own.
        self._held: set[tuple[str, str]] = set()
        # (key, token) admitted by the local fallback (released locally).
        self._local_tokens: set[tuple[str, str]] = set()
        # Releases on their way to Redis, by key: this replica's next admission of the key
        # waits for them, so a client's next request sees its last one's room freed.
        self._releasing: dict[str, set[asyncio.Future[None]]] = {}
        # Releases that failed while Redis was down: (key, token).
        self._orphans: set[tuple[str, str]] = set()
        self.spooled = False

    def _keys(self, key: str) -> tuple[str, str, str, str, str]:
        """rpm, conc, resv, resvn, resvs (see `Keys.limits` and admit.lua)."""
        return self._s.keys.limits(key)

    def _used_keys(self, key: str, now: float) -> tuple[str, str]:
        day, month = current_periods(now)
        return self._s.keys.used(key, day), self._s.keys.used(key, month)

    async def admit(
        self, key: str, limits: LimitsConfig, token: str, images: int, now: float
    ) -> Decision:
        def arg(v: int | None) -> int:
            return -1 if v is None else v

        reserve = images if has_quota(limits) else 0
        releasing = self._releasing.get(key)
        if releasing:  # asyncio.wait, not gather: a cancelled admission leaves them be
            await asyncio.wait(releasing)  # it copies the set
        script = self._s.scripts["admit"]
        result = await self._s.call(
            lambda: script(
                keys=[*self._keys(key), *self._used_keys(key, now)],
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
                self._local_tokens.add((key, token))
            return decision
        code, now_ms, recent, oldest, inflight, used_d, used_m, reserved = (int(x) for x in result)
        self._seed(key, now, used_d, used_m)
        if code == 0:
            self._held.add((key, token))
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
            decision = Decision(False, LIMIT_CODES[code], 1, used_d, used_m, reserved)
        return decision

    def _seed(self, key: str, now: float, used_d: int, used_m: int) -> None:
        day, month = current_periods(now)
        self.local.used[(key, day)] = used_d
        self.local.used[(key, month)] = used_m

    def release(self, key: str, token: str) -> None:
        held = (key, token)
        if held in self._local_tokens:
            self._local_tokens.discard(held)
            self.local.release(key, token)
            return
        if held not in self._held:
            return
        self._held.remove(held)
        task = self._s.spawn(self._release_remote(key, [token]))
        # One set per limiter key (configured keys and their spend keys), kept when empty.
        releasing = self._releasing.setdefault(key, set())
        releasing.add(task)
        task.add_done_callback(releasing.discard)

    async def _release_remote(self, key: str, tokens: list[str]) -> None:
        script = self._s.scripts["release"]
        done = await self._s.call(lambda: script(keys=list(self._keys(key)[1:]), args=tokens))
        if done is None:
            self._orphans.update((key, t) for t in tokens)

    async def hold_for_task(self, key: str, token: str, task_id: str, now: float) -> None:
        if (key, token) in self._local_tokens:
            self.local.hold_now(key, token, task_id, now)
            return
        script = self._s.scripts["hold"]
        await self._s.call(
            lambda: script(
                keys=list(self._keys(key)[2:]), args=[token, "t:" + task_id, _ms(TASK_HOLD_SECONDS)]
            )
        )

    async def settle_task(self, key: str, task_id: str) -> None:
        await self.local.settle_task(key, task_id)
        script = self._s.scripts["release"]
        await self._s.call(lambda: script(keys=list(self._keys(key)[1:]), args=["t:" + task_id]))

    async def record_usage(
        self, key: str, images: int, tokens: Iterable[str], now: float
    ) -> tuple[int, int]:
        toks = list(tokens)
        script = self._s.scripts["usage"]
        result = await self._s.call(
            lambda: script(
                keys=[*self._used_keys(key, now), *self._keys(key)[2:]],
                args=[images, DAY_TTL, MONTH_TTL, *toks],
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
        keys = self._used_keys(key, now)
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
        for key, token in self._held:
            by_key.setdefault(key, []).append(token)
        script = self._s.scripts["refresh"]
        for key, tokens in by_key.items():
            conc, resv = self._keys(key)[1:3]
            await script(keys=[conc, resv], args=[_ms(LEASE_SECONDS), *tokens])

    async def push_spool(self) -> None:
        """Usage and releases recorded while Redis was down, written to Redis."""
        if self._orphans:
            by_key: dict[str, list[str]] = {}
            for key, token in self._orphans:
                by_key.setdefault(key, []).append(token)
            script = self._s.scripts["release"]
            for key, tokens in by_key.items():
                await script(keys=list(self._keys(key)[1:]), args=tokens)
            self._orphans.clear()
        # Cleared before the drain: usage spooled while this push runs sets it again, so
        # the next monitor tick pushes it (cleared after, it would be stranded).
        self.spooled = False
        rows = await self._s.spool.drain_usage()
        sent = 0
        try:
            for key, period, images in rows:
                ttl = DAY_TTL if period.startswith("d:") else MONTH_TTL
                name = self._s.keys.used(key, period)
                await self._s.scripts["add"](keys=[name], args=[images, ttl])
                sent += 1
        finally:
            if sent < len(rows):
                self.spooled = True
            for key, period, images in rows[sent:]:  # keep what was not sent
                await self._s.spool.add_usage(key, images, [period])
        if rows:
            log.warning("redis: added %d spooled usage row(s) from the outage", len(rows))


# ------------------------------------------------------------------------ tasks
