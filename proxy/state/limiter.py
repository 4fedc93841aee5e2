"""Per-key limits: what they count, how a request is admitted, and the in-process limiter.

The four limits of `keys[].limits` apply to *generation* requests (the native
service calls, `/v1/images/generations`, `/v1/images/edits`,
`/aliyun/v1/images/generations`), not to task polls, lists or uploads:
throttling a poll would lose the result of a generation that is already
billed.

- `requests_per_minute`: a sliding 60-second window of admitted requests.
- `concurrent_requests`: admitted requests still in flight.
- `images_per_day` / `images_per_month` (UTC calendar day / month): images
  DashScope reported (the same counts as `dashscope_proxy_images_total`),
  plus images *reserved* by requests in flight and by async tasks not yet
  finished. A request is refused before it reaches DashScope when the
  images it may generate (`parameters.n`, or the model's default n) would
  not fit in what remains. When DashScope reports fewer images than
  reserved, the difference is free again at once.

A reservation is identified by a token: the request id while the request is
in flight, `t:<task_id>` once an async submit created a task (held until the
task's images are metered or it ends, at most `TASK_HOLD_SECONDS`).

`LocalLimiter` is the in-process implementation: exact for one process,
per-process with several (Redis makes them shared: `proxy.state.redis`). It is
synchronous (no await between check and update), so admission is atomic.
Deliberately not here: persistence (`proxy.state.local`), Redis
(`proxy.state.redis`), the request's cost and refusal (`proxy.core.limits`) and the
request plumbing (`proxy.core.admission`).
"""

from __future__ import annotations

import calendar
import heapq
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple, Protocol

from proxy.config.memo import per_config
from proxy.config.model import LimitsConfig

WINDOW_SECONDS = 60.0
# An async task's reservation lapses after this long even if nobody polls it:
# DashScope finishes image tasks within minutes.
TASK_HOLD_SECONDS = 3600.0
# Refused because of reservations of requests still in flight: they settle soon.
RESERVED_RETRY_SECONDS = 30
DAY, MONTH = "day", "month"
RPM, CONCURRENCY = "requests_per_minute", "concurrent_requests"
IMAGES_DAY, IMAGES_MONTH = "images_per_day", "images_per_month"


@lru_cache(maxsize=64)
def _period_keys(day_index: int) -> tuple[str, str]:
    """The counter keys of the UTC day and month of day number `day_index` since the
    epoch (POSIX time has no leap seconds: every UTC day is 86,400 of its seconds)."""
    t = time.gmtime(day_index * 86400)
    return "d:" + time.strftime("%Y%m%d", t), "m:" + time.strftime("%Y%m", t)


def current_periods(ts: float) -> tuple[str, str]:
    """`("d:20250131", "m:202501")`: the keys of the UTC day's and month's counters that
    `ts` counts in (memoised per day: asked several times per metered request)."""
    return _period_keys(int(ts // 86400))


def day_period(ts: float) -> str:
    """`20250131`: the UTC day a timestamp falls in."""
    return current_periods(ts)[0][2:]


def month_period(ts: float) -> str:
    """`202501`: the UTC month a timestamp falls in."""
    return current_periods(ts)[1][2:]


def seconds_to_next_day(ts: float) -> int:
    return max(1, math.ceil(86400 - ts % 86400))


def seconds_to_next_month(ts: float) -> int:
    t = time.gmtime(ts)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(1, math.ceil(calendar.timegm((year, month, 1, 0, 0, 0)) - ts))


@per_config
def has_limits(limits: LimitsConfig) -> bool:
    """Does `limits` set any request or image limit? (Memoised: asked on every request.)"""
    return any(
        v is not None
        for v in (
            limits.requests_per_minute,
            limits.concurrent_requests,
            limits.images_per_day,
            limits.images_per_month,
        )
    )


def has_quota(limits: LimitsConfig) -> bool:
    return limits.images_per_day is not None or limits.images_per_month is not None


# --------------------------------------------------------------------- decisions


class Decision(NamedTuple):
    """The outcome of one admission. `limit` names the limit that refused it. (A named
    tuple: made twice per limited request, at a third of a frozen dataclass's cost.)"""

    allowed: bool
    limit: str | None = None
    retry_after: int = 1
    # What the limiter saw (for the remaining-quota gauge and messages).
    used_day: int = 0
    used_month: int = 0
    reserved: int = 0


def decide(
    limits: LimitsConfig,
    *,
    now: float,
    recent: int,
    oldest: float | None,
    inflight: int,
    used_day: int,
    used_month: int,
    reserved: int,
    images: int,
) -> Decision:
    """Pure: admit or refuse, given what the limiter counts right now."""
    rpm = limits.requests_per_minute
    if rpm is not None and recent >= rpm:
        wait = (oldest + WINDOW_SECONDS - now) if oldest is not None else WINDOW_SECONDS
        return Decision(False, RPM, max(1, math.ceil(wait)), used_day, used_month, reserved)
    if limits.concurrent_requests is not None and inflight >= limits.concurrent_requests:
        return Decision(False, CONCURRENCY, 1, used_day, used_month, reserved)
    day_cap, month_cap = limits.images_per_day, limits.images_per_month
    if day_cap is not None and used_day + reserved + images > day_cap:
        # Over on what was generated alone: only the window's end helps;
        # else requests in flight may leave room when they settle.
        retry = seconds_to_next_day(now) if used_day + images > day_cap else RESERVED_RETRY_SECONDS
        return Decision(False, IMAGES_DAY, retry, used_day, used_month, reserved)
    if month_cap is not None and used_month + reserved + images > month_cap:
        retry = (
            seconds_to_next_month(now)
            if used_month + images > month_cap
            else RESERVED_RETRY_SECONDS
        )
        return Decision(False, IMAGES_MONTH, retry, used_day, used_month, reserved)
    return Decision(True, None, 1, used_day, used_month, reserved)


# ------------------------------------------------------------------- the limiter


class Limiter(Protocol):
    """What admission needs from a limiter (local, or Redis with a local fallback)."""

    async def admit(
        self, key: str, limits: LimitsConfig, token: str, images: int, now: float
    ) -> Decision: ...

    def release(self, key: str, token: str) -> None:
        """The request ended: free its concurrency slot and request-scoped reservation."""

    async def hold_for_task(self, key: str, token: str, task_id: str, now: float) -> None:
        """Move a request's reservation to its task (async submit accepted)."""

    async def settle_task(self, key: str, task_id: str) -> None:
        """The task ended without images being metered: drop its reservation."""

    async def record_usage(
        self, key: str, images: int, tokens: Iterable[str], now: float
    ) -> tuple[int, int]:
        """Images metered: count them, drop the reservations `tokens`; (day, month) used."""

    async def usage(self, key: str, now: float) -> tuple[int, int]:
        """Images used this UTC day and month."""


class Reservations:
    """Images reserved per token (a request in flight, or `t:<task id>` for a task),
    each with an expiry (request-scoped ones never expire: they are released).

    Admission reads the sum on every request, so the sum is kept as reservations come
    and go, and task holds expire through a heap: O(log n) per change, not a scan of
    every request and task in flight (thousands of held requests or outstanding tasks).
    """

    __slots__ = ("_expiring", "_held", "total")

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, float]] = {}
        self._expiring: list[tuple[float, str]] = []  # (expiry, token); may hold stale ones
        self.total = 0

    def add(self, token: str, images: int, expiry: float = math.inf) -> None:
        self.pop(token)
        self._held[token] = (images, expiry)
        self.total += images
        if expiry != math.inf:
            heapq.heappush(self._expiring, (expiry, token))
            if len(self._expiring) > 2 * len(self._held) + 64:
                # Mostly entries of holds already settled: rebuild from what is held.
                self._expiring = [(e, t) for t, (_, e) in self._held.items() if e != math.inf]
                heapq.heapify(self._expiring)

    def pop(self, token: str) -> tuple[int, float] | None:
        held = self._held.pop(token, None)
        if held is not None:
            self.total -= held[0]
        return held

    def sum_at(self, now: float) -> int:
        """Images reserved at `now`, expired holds dropped."""
        heap = self._expiring
        while heap and heap[0][0] <= now:
            expiry, token = heapq.heappop(heap)
            held = self._held.get(token)
            if held is not None and held[1] == expiry:
                self.pop(token)
        return self.total


@dataclass(slots=True)
class _KeyState:
    recent: deque[float] = field(default_factory=deque)  # admission times, last minute
    inflight: set[str] = field(default_factory=set)  # request tokens
    reserved: Reservations = field(default_factory=Reservations)


class LocalLimiter:
    """In-process counters. `used` can be seeded (from SQLite or from Redis)."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}
        # (key, "d:20250131" | "m:202501") -> images
        self.used: dict[tuple[str, str], int] = {}

    def _state(self, key: str) -> _KeyState:
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _KeyState()
        return st

    def used_now(self, key: str, now: float) -> tuple[int, int]:
        day, month = current_periods(now)
        used = self.used
        return used.get((key, day), 0), used.get((key, month), 0)

    def reserved_now(self, key: str, now: float) -> int:
        return self._state(key).reserved.sum_at(now)

    def admit_now(
        self, key: str, limits: LimitsConfig, token: str, images: int, now: float
    ) -> Decision:
        st = self._state(key)
        while st.recent and st.recent[0] <= now - WINDOW_SECONDS:
            st.recent.popleft()
        used_day, used_month = self.used_now(key, now)
        decision = decide(
            limits,
            now=now,
            recent=len(st.recent),
            oldest=st.recent[0] if st.recent else None,
            inflight=len(st.inflight),
            used_day=used_day,
            used_month=used_month,
            reserved=self.reserved_now(key, now),
            images=images,
        )
        if decision.allowed:
            if limits.requests_per_minute is not None:
                st.recent.append(now)
            st.inflight.add(token)
            if images and has_quota(limits):
                st.reserved.add(token, images)
        return decision

    async def admit(
        self, key: str, limits: LimitsConfig, token: str, images: int, now: float
    ) -> Decision:
        return self.admit_now(key, limits, token, images, now)

    def release(self, key: str, token: str) -> None:
        st = self._state(key)
        st.inflight.discard(token)
        st.reserved.pop(token)

    def hold_now(self, key: str, token: str, task_id: str, now: float) -> None:
        st = self._state(key)
        held = st.reserved.pop(token)
        if held is not None:
            st.reserved.add("t:" + task_id, held[0], now + TASK_HOLD_SECONDS)

    async def hold_for_task(self, key: str, token: str, task_id: str, now: float) -> None:
        self.hold_now(key, token, task_id, now)

    async def settle_task(self, key: str, task_id: str) -> None:
        self._state(key).reserved.pop("t:" + task_id)

    def add_usage(
        self, key: str, images: int, tokens: Iterable[str], now: float
    ) -> tuple[int, int]:
        st = self._state(key)
        for t in tokens:
            st.reserved.pop(t)
        day, month = current_periods(now)
        used = self.used
        used_day = used[(key, day)] = used.get((key, day), 0) + images
        used_month = used[(key, month)] = used.get((key, month), 0) + images
        return used_day, used_month

    async def record_usage(
        self, key: str, images: int, tokens: Iterable[str], now: float
    ) -> tuple[int, int]:
        return self.add_usage(key, images, tokens, now)

    async def usage(self, key: str, now: float) -> tuple[int, int]:
        return self.used_now(key, now)

    def forget_old(self, now: float) -> None:
        """Drop counters of past days and months (bounded memory)."""
        keep = set(current_periods(now))
        for k in [k for k in self.used if k[1] not in keep]:
            del self.used[k]
