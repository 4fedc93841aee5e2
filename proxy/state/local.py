"""State backends: where task ownership, once-per-task metering and limit counters live.

`state.backend: local` (the default) is one process's state: tasks in SQLite
(`state.path`), limit counters in memory, and image usage per key and UTC
day/month persisted in the same SQLite file, so a restart does not reset
quotas. `state.backend: redis` (`proxy.state.redis`) shares all of it
between replicas and falls back to this file and in-process counters while
Redis is unreachable.

A backend offers `tasks` (a `TaskStore`), `limiter` (a `limits.Limiter`) and
`problems()`: what is degraded right now, for `/readyz`. The app owns one
backend (created and closed in a cleanup context). Switching backends needs a
restart; a config reload keeps the running one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.config.model import StateConfig
from proxy.state import Claim, owner_gone
from proxy.state.idempotency import IdempotencyStore, SqliteIdempotency
from proxy.state.limiter import Limiter, LocalLimiter, current_periods
from proxy.state.tasks import COLUMNS, SqliteTaskStore, TaskRecord, TaskStore, record_of_row

log = logging.getLogger(__name__)

_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key    TEXT NOT NULL,
    period TEXT NOT NULL,   -- d:YYYYMMDD | m:YYYYMM (UTC)
    images INTEGER NOT NULL,
    PRIMARY KEY (key, period)
);
"""


class LocalStore(SqliteTaskStore):
    """The SQLite task store plus metering claims and a per-key image usage table.

    With the local backend the usage table holds the totals; with Redis it is
    the outage spool: usage not yet added to Redis (drained on recovery), and
    tasks recorded or claimed during the outage, handed to Redis row by row
    (`hand_over`, then `drop_handed`) so no claim made meanwhile is lost.
    """

    def _open(self) -> None:
        super()._open()
        self._db().executescript(_USAGE_SCHEMA)

    async def add_usage(self, key: str, images: int, periods: Iterable[str]) -> None:
        await self.add_usage_rows({(key, p): images for p in periods})

    async def add_usage_rows(self, usage: dict[tuple[str, str], int]) -> None:
        rows = [(key, period, images) for (key, period), images in usage.items()]

        def op() -> None:
            self._db().executemany(
                "INSERT INTO usage VALUES (?,?,?) ON CONFLICT(key, period) "
                "DO UPDATE SET images = images + excluded.images",
                rows,
            )

        await self._run(op)

    async def load_usage(self, periods: Iterable[str]) -> dict[tuple[str, str], int]:
        wanted = list(periods)

        def op() -> dict[tuple[str, str], int]:
            marks = ",".join("?" * len(wanted))
            rows = (
                self._db()
                .execute(
                    f"SELECT key, period, images FROM usage WHERE period IN ({marks})",  # noqa: S608
                    wanted,
                )
                .fetchall()
            )
            return {(str(k), str(p)): int(n) for k, p, n in rows}

        return await self._run(op)

    async def drain_usage(self) -> list[tuple[str, str, int]]:
        """Every usage row, deleted in the same transaction (the spool, handed to Redis)."""

        def op() -> list[tuple[str, str, int]]:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute("SELECT key, period, images FROM usage").fetchall()
                db.execute("DELETE FROM usage")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return [(str(k), str(p), int(n)) for k, p, n in rows]

        return await self._run(op)

    async def purge_usage(self, keep: Iterable[str]) -> None:
        kept = list(keep)

        def op() -> None:
            marks = ",".join("?" * len(kept))
            self._db().execute(f"DELETE FROM usage WHERE period NOT IN ({marks})", kept)  # noqa: S608

        await self._run(op)

    # ------------------------------------------------------------ metering claims

    async def claim_state(self, task_id: str, claim: Claim | None) -> str:
        """Claim `task_id` here: WON, LOST (claimed before), HANDED (being written to
        Redis by a spool push: claim it there) or ABSENT (no such row)."""
        text = None if claim is None else claim.encode()
        at = None if claim is None else claim.at

        def op() -> str:
            db = self._db()
            for _ in range(2):
                cur = db.execute(
                    "UPDATE tasks SET metered = ?, claim = ?, claimed_at = ? "
                    "WHERE task_id = ? AND metered = 0 AND handed IS NULL",
                    (1 if claim is None else 2, text, at, task_id),
                )
                if cur.rowcount == 1:
                    return WON
                sql = "SELECT metered, handed FROM tasks WHERE task_id = ?"
                row = db.execute(sql, (task_id,)).fetchone()
                if row is None or row[0] or not owner_gone(str(row[1])):
                    break
                # Its pusher died mid-handover: the row is this file's again.
                sql = "UPDATE tasks SET handed = NULL WHERE task_id = ? AND handed = ?"
                db.execute(sql, (task_id, row[1]))
            return ABSENT if row is None else LOST if row[0] else HANDED

        return await self._run(op)

    async def claim_metering(self, task_id: str, claim: Claim | None = None) -> bool:
        return await self.claim_state(task_id, claim) == WON

    async def finish_metering(self, task_id: str, claim: Claim) -> bool:
        return await self._update(
            "UPDATE tasks SET metered = 1 WHERE task_id = ? AND metered = 2 AND claim = ?",
            (task_id, claim.encode()),
        )

    async def take_over(self, task_id: str, old: Claim, new: Claim) -> bool:
        return await self._update(
            "UPDATE tasks SET claim = ?, claimed_at = ? "
            "WHERE task_id = ? AND metered = 2 AND claim = ? AND handed IS NULL",
            (new.encode(), new.at, task_id, old.encode()),
        )

    async def _update(self, sql: str, args: tuple[object, ...]) -> bool:
        return await self._run(lambda: self._db().execute(sql, args).rowcount == 1)

    async def pending_claims(self, before: float, limit: int) -> list[tuple[str, Claim]]:
        def op() -> list[tuple[str, str]]:
            sql = (
                "SELECT task_id, claim FROM tasks WHERE metered = 2 AND claimed_at <= ? "
                "ORDER BY claimed_at LIMIT ?"
            )
            return [(str(t), str(c)) for t, c in self._db().execute(sql, (before, limit))]

        found = [(t, Claim.decode(c)) for t, c in await self._run(op)]
        return [(t, c) for t, c in found if c is not None]

    # ------------------------------------------------- the outage spool's handover

    async def hand_over(self, owner: str, limit: int) -> list[SpoolRow]:
        """Up to `limit` rows marked as being written to Redis by `owner`, as they are
        now. From here on no claim is won on them in this file (`claim_state` says
        HANDED), so the claims they carry are final: one statement, atomic for every
        process sharing the file. Rows left handed by a dead pusher are taken too."""

        def op() -> list[SpoolRow]:
            db = self._db()
            handers = db.execute("SELECT DISTINCT handed FROM tasks WHERE handed IS NOT NULL")
            stale = [str(h) for (h,) in handers if h == owner or owner_gone(str(h))]
            cond = "handed IS NULL"
            if stale:
                cond += f" OR handed IN ({','.join('?' * len(stale))})"
            sql = (
                f"UPDATE tasks SET handed = ? WHERE task_id IN (SELECT task_id FROM tasks "  # noqa: S608
                f"WHERE {cond} ORDER BY created_at LIMIT ?) RETURNING {_SPOOL_COLUMNS}"
            )
            return [_spool_row(r) for r in db.execute(sql, (owner, *stale, limit)).fetchall()]

        return await self._run(op)

    async def release_handed(self, owner: str, task_ids: list[str]) -> None:
        """The push failed: the rows are this file's again."""
        marks = ",".join("?" * len(task_ids))
        sql = f"UPDATE tasks SET handed = NULL WHERE handed = ? AND task_id IN ({marks})"  # noqa: S608
        await self._run(lambda: self._db().execute(sql, (owner, *task_ids)))

    async def drop_handed(self, owner: str, task_ids: list[str]) -> list[SpoolRow]:
        """The rows are in Redis: delete them, returned as they were at the end (a
        status or a finished claim may have changed meanwhile)."""
        marks = ",".join("?" * len(task_ids))
        sql = (
            f"DELETE FROM tasks WHERE handed = ? AND task_id IN ({marks}) "  # noqa: S608
            f"RETURNING {_SPOOL_COLUMNS}"
        )
        rows = await self._run(lambda: self._db().execute(sql, (owner, *task_ids)).fetchall())
        return [_spool_row(r) for r in rows]


WON, LOST, HANDED, ABSENT = "won", "lost", "handed", "absent"
_SPOOL_COLUMNS = f"{COLUMNS}, metered, claim"


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """A spooled task as handed to Redis: its record, the raw `metered` column (0
    unclaimed, 1 counted here, 2 pending here, 3 claimed elsewhere) and its claim."""

    record: TaskRecord
    metered: int
    claim: str | None


def _spool_row(row: tuple[object, ...]) -> SpoolRow:
    claim = row[-1]
    return SpoolRow(
        record_of_row(row[:-2]), int(str(row[-2])), None if claim is None else str(claim)
    )


class StateBackend(abc.ABC):
    """Tasks, limits, kept `Idempotency-Key` answers and their health, for one app."""

    name: str
    tasks: TaskStore
    limiter: Limiter
    idempotency: IdempotencyStore

    @property
    def up(self) -> bool:
        """False while serving from a fallback."""
        return True

    def problems(self) -> list[str]:
        """What is degraded right now (for /readyz); empty when all is well."""
        return []

    @abc.abstractmethod
    async def close(self) -> None: ...


class PersistedLimiter(LocalLimiter):
    """The local limiter whose image usage is written behind to SQLite.

    The in-memory count (what admission reads) changes at once; the SQLite
    write is batched by one flusher task that lingers `FLUSH_LINGER_SECONDS`
    to gather what arrives meanwhile, so a metered request never waits for the
    disk and a busy gateway writes a few transactions a second, not one per
    request. A crash loses at most that last batch of *quota* usage, never the
    image metric or the usage ledger. Old periods are purged once per UTC day.
    """

    FLUSH_LINGER_SECONDS = 0.25

    def __init__(self, store: LocalStore) -> None:
        super().__init__()
        self._store = store
        self._day = ""
        self._pending: dict[tuple[str, str], int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._purge_due = True
        self._wake = asyncio.Event()  # set at shutdown: stop lingering, write now

    async def record_usage(
        self, key: str, images: int, tokens: Iterable[str], now: float
    ) -> tuple[int, int]:
        used = self.add_usage(key, images, tokens, now)
        periods = current_periods(now)
        if periods[0] != self._day:  # a new UTC day: forget yesterday's counters
            self._day = periods[0]
            self.forget_old(now)
            self._purge_due = True
        for period in periods:
            self._pending[(key, period)] = self._pending.get((key, period), 0) + images
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return used

    async def _flush(self) -> None:
        # Linger before *every* write, not only the first: what is metered while a
        # write is on the thread waits for the next batch instead of being written at
        # once, so a busy gateway writes about 1 / FLUSH_LINGER_SECONDS transactions a
        # second rather than one per thread round trip.
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.FLUSH_LINGER_SECONDS)
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                await self._store.add_usage_rows(batch)
                if self._purge_due:
                    await self._store.purge_usage(current_periods(time.time()))
                    self._purge_due = False
            except Exception:
                log.exception(
                    "writing quota usage to %s failed; retrying with the next usage",
                    "the state file",
                )
                for k, n in batch.items():
                    self._pending[k] = self._pending.get(k, 0) + n
                return

    async def close(self) -> None:
        """Write what is pending (shutdown), without waiting out the linger."""
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        await self._flush()


class LocalState(StateBackend):
    """The embedded backend: SQLite on local disk and in-process counters."""

    name = "local"

    limiter: PersistedLimiter

    def __init__(
        self, store: LocalStore, limiter: PersistedLimiter, idempotency: SqliteIdempotency
    ) -> None:
        self.tasks = store
        self.limiter = limiter
        self._store = store
        self.idempotency = self._idempotency = idempotency

    @classmethod
    async def open(cls, config: StateConfig) -> LocalState:
        store = LocalStore(config.path)
        await store.open()
        limiter = PersistedLimiter(store)
        limiter.used.update(await store.load_usage(current_periods(time.time())))
        idempotency = SqliteIdempotency(config.path)
        await idempotency.open()
        return cls(store, limiter, idempotency)

    async def close(self) -> None:
        await self.limiter.close()
        await self._idempotency.close()
        await self._store.close()
