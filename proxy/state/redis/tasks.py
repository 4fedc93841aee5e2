"""Task ownership, metering claims and the reconciler's schedule on Redis.

A task recorded during an outage lives in the local spool until it is handed to
Redis (`RedisState.push_tasks`); until then the spool row is where its claim is
won, afterwards Redis. A claim that finds the row being handed over waits for
the handover and is then made in Redis, so the two never both win.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from proxy.errors import state_unavailable
from proxy.state import Claim
from proxy.state.local import HANDED, LOST, WON
from proxy.state.redis.common import (
    FAILURES,
    RECOVERY_GRACE_SECONDS,
    RETENTION_SECONDS,
    Backend,
    Keys,
    claim_of,
    claim_value,
)
from proxy.state.tasks import TERMINAL, TaskRecord

log = logging.getLogger(__name__)

R = TypeVar("R")
# A claim on a row being handed to Redis waits for the handover, this long at most (a
# push writes one batch in a single pipeline, bounded by the socket timeout).
HANDOVER_WAIT_SECONDS = 5.0
HANDOVER_POLL_SECONDS = 0.02


class RedisTaskStore:
    """`TaskStore` on Redis; the local SQLite file holds what was created during an outage."""

    _RECENT_MAX = 1024

    def __init__(self, state: Backend) -> None:
        self._s = state
        self.spooled = True  # check the spool once at startup (and after each outage)
        self.spool_writes = 0  # rows added to the spool, ever: a push ends only when none came
        # Records read recently: a claim whose Redis call fails can still be spooled.
        self._recent: OrderedDict[str, TaskRecord] = OrderedDict()
        # Claims counted while Redis was unreachable, marked done on recovery.
        self.unfinished: dict[str, Claim] = {}

    def remember(self, record: TaskRecord) -> None:
        self._recent[record.task_id] = record
        self._recent.move_to_end(record.task_id)
        while len(self._recent) > self._RECENT_MAX:
            self._recent.popitem(last=False)

    async def put(self, record: TaskRecord) -> None:
        script = self._s.scripts["put"]
        keys, args = put_call(self._s.keys, record)
        done = await self._s.call(lambda: script(keys=keys, args=args))
        if done is None:
            self._s.fallback("tasks")
            await self._spool(record)
        else:
            self.remember(record)

    async def _spool(self, record: TaskRecord, metered: int | None = None) -> None:
        await self._s.spool.put(record, metered)
        self.spool_writes += 1
        self.spooled = True

    async def _direct(self, op: Callable[[], Awaitable[R]]) -> R | None:
        """`op` on Redis when it is up or being recovered; None when it is not or fails."""
        if not (self._s.up or self._s.recovering):
            return None
        try:
            return await op()
        except FAILURES as exc:
            self._s.mark_down(exc)
            return None

    async def _read(self, task_id: str) -> TaskRecord | None:
        async with self._s.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._s.keys.task(task_id))
            pipe.exists(self._s.keys.metered(task_id))
            fields, metered = await pipe.execute()
        return _record(task_id, fields, bool(metered))

    async def get(self, task_id: str) -> TaskRecord | None:
        if self._s.up:
            try:
                record = await self._read(task_id)
            except FAILURES as exc:
                self._s.mark_down(exc)
            else:
                if record is None and self.spooled:
                    record = await self._s.spool.get(task_id)
                if record is not None:
                    self.remember(record)
                elif time.monotonic() - self._s.recovered_at < RECOVERY_GRACE_SECONDS:
                    raise state_unavailable()  # maybe not written back by its replica yet
                return record
        self._s.fallback("tasks")
        record = await self._s.spool.get(task_id)
        if record is None and self._s.recovering:  # handed over a moment ago, maybe
            record = await self._direct(lambda: self._read(task_id))
        if record is None:
            # Maybe another replica's task: never answer UNKNOWN for it.
            raise state_unavailable()
        return record

    async def set_status(self, task_id: str, status: str) -> None:
        script = self._s.scripts["set_status"]
        final = "1" if status in TERMINAL else "0"
        keys = [self._s.keys.task(task_id), self._s.keys.reconcile]
        done = await self._direct(lambda: script(keys=keys, args=[status, final, task_id]))
        if done is None or (done == 0 and self.spooled):
            await self._s.spool.set_status(task_id, status)
        recent = self._recent.get(task_id)
        if recent is not None:
            self._recent[task_id] = replace(recent, status=status)

    async def claim_metering(self, task_id: str, claim: Claim | None = None) -> bool:
        value = claim_value(None if claim is None else claim.encode(), pending=claim is not None)
        at = "" if claim is None else repr(claim.at)
        keys = [self._s.keys.task(task_id), *self._s.keys.claim(task_id)]

        async def in_redis() -> int:
            script = self._s.scripts["claim"]
            return int(await script(keys=keys, args=[RETENTION_SECONDS, value, task_id, at]))

        deadline = time.monotonic() + HANDOVER_WAIT_SECONDS
        asked = copied = False
        while True:
            local = self.spooled or not self._s.up
            if local:  # a spooled row decides, until it has been handed to Redis
                state = await self._s.spool.claim_state(task_id, claim)
                if state in (WON, LOST):
                    if not self._s.up:
                        self._s.fallback("tasks")
                    return state == WON
                if state == HANDED:  # on its way to Redis: claim it there once it arrived
                    if time.monotonic() >= deadline:
                        log.warning("task %s: its handover to redis did not end", task_id)
                        return False
                    await asyncio.sleep(HANDOVER_POLL_SECONDS)
                    continue
            won = await self._direct(in_redis)
            if won is not None:
                if won >= 0 or asked or not local:
                    return won == 1
                asked = True  # unknown to Redis: spooled between the two looks?
                continue
            recent = self._recent.get(task_id)
            if recent is None or copied:
                return False
            # Read from Redis a moment ago, unreachable now: claim it here, written back on
            # recovery (a copy: `metered` 3 if Redis showed it claimed, never pushed as ours).
            await self._spool(recent, 3 if recent.metered else 0)
            copied = True

    async def finish_metering(self, task_id: str, claim: Claim) -> bool:
        if (self.spooled or not self._s.up) and await self._s.spool.finish_metering(task_id, claim):
            return True
        text = claim.encode()
        done = await self._cas(
            task_id, claim_value(text, pending=True), claim_value(text, pending=False), ""
        )
        if done is None:  # Redis unreachable: marked done on recovery
            self.unfinished[task_id] = claim
            return True
        return done

    async def take_over(self, task_id: str, old: Claim, new: Claim) -> bool:
        if (self.spooled or not self._s.up) and await self._s.spool.take_over(task_id, old, new):
            return True
        done = await self._cas(
            task_id,
            claim_value(old.encode(), pending=True),
            claim_value(new.encode(), pending=True),
            repr(new.at),
        )
        return bool(done)

    async def _cas(self, task_id: str, expected: str, value: str, at: str) -> bool | None:
        script = self._s.scripts["cas"]
        args: list[str | int] = [expected, value, RETENTION_SECONDS, task_id, at]
        done = await self._direct(lambda: script(keys=self._s.keys.claim(task_id), args=args))
        return None if done is None else done == 1

    async def pending_claims(self, before: float, limit: int) -> list[tuple[str, Claim]]:
        found: list[tuple[str, Claim]] = []
        if self.spooled or not self._s.up:
            found += await self._s.spool.pending_claims(before, limit)
        if self._s.up:
            try:
                found += await self._pending(before, limit)
            except FAILURES as exc:
                self._s.mark_down(exc)
        return found

    async def _pending(self, before: float, limit: int) -> list[tuple[str, Claim]]:
        r = self._s.redis
        ids = await r.zrangebyscore(self._s.keys.pending, "-inf", before, start=0, num=limit)
        if not ids:
            return []
        found: list[tuple[str, Claim]] = []
        gone: list[str] = []
        task_ids = [str(t) for t in ids]
        values = await r.mget([self._s.keys.metered(t) for t in task_ids])
        for task_id, value in zip(task_ids, values, strict=True):
            pending, text = claim_of(None if value is None else str(value))
            claim = Claim.decode(text) if pending else None
            if claim is None:
                gone.append(task_id)  # done meanwhile, or expired
            else:
                found.append((task_id, claim))
        if gone:
            await r.zrem(self._s.keys.pending, *gone)
        return found

    async def due(self, now: float, limit: int, lease: float) -> list[TaskRecord]:
        if self._s.up:
            try:
                ids = await self._s.scripts["due"](
                    keys=[self._s.keys.reconcile], args=[repr(now), limit, repr(now + lease)]
                )
                ids = [str(i) for i in ids]
                records = await self._fetch(ids, metered=True)
                gone = [t for t, r in zip(ids, records, strict=True) if r is None]
                if gone:  # expired (DashScope forgot it long ago): stop looking
                    await self._s.redis.zrem(self._s.keys.reconcile, *gone)
                found = [r for r in records if r is not None]
                if self.spooled:
                    found += await self._s.spool.due(now, limit, lease)
                return found
            except FAILURES as exc:
                self._s.mark_down(exc)
        self._s.fallback("tasks")
        return await self._s.spool.due(now, limit, lease)

    async def reschedule(self, task_id: str, at: float) -> None:
        schedule = self._s.keys.reconcile
        done = await self._s.call(lambda: self._s.redis.zadd(schedule, {task_id: at}, xx=True))
        if done is None or self.spooled:
            await self._s.spool.reschedule(task_id, at)

    async def count_due(self, now: float) -> int:
        schedule = self._s.keys.reconcile
        count = await self._s.call(lambda: self._s.redis.zcount(schedule, "-inf", now))
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
            except FAILURES as exc:
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
        index = self._s.keys.tasks(key)
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
                pipe.hgetall(self._s.keys.task(task_id))
                if metered:
                    pipe.exists(self._s.keys.metered(task_id))
            rows = await pipe.execute()
        if not metered:
            return [_record(t, f, False) for t, f in zip(ids, rows, strict=True)]
        return [_record(t, rows[2 * i], bool(rows[2 * i + 1])) for i, t in enumerate(ids)]

    async def close(self) -> None:
        """Closed with its `Backend`."""


def put_call(keys: Keys, record: TaskRecord) -> tuple[list[str], list[Any]]:
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
    names = [keys.task(record.task_id), keys.tasks(record.key), keys.reconcile]
    return names, [record.task_id, repr(record.created_at), RETENTION_SECONDS, next_check, *fields]


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
