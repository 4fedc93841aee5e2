"""Task ownership, metering claims and the reconciler's schedule on Redis."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from proxy.errors import state_unavailable
from proxy.state.redis.common import (
    FAILURES,
    RECONCILE_KEY,
    RECOVERY_GRACE_SECONDS,
    RETENTION_SECONDS,
    Backend,
)
from proxy.state.tasks import TERMINAL, TaskRecord

log = logging.getLogger(__name__)


class RedisTaskStore:
    """`TaskStore` on Redis; the local SQLite file holds what was created during an outage."""

    _RECENT_MAX = 1024

    def __init__(self, state: Backend) -> None:
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
            except FAILURES as exc:
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
            except FAILURES as exc:
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
        """Closed with its `Backend`."""

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
