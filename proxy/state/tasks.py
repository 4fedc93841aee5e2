"""Task ownership and routing: who created which DashScope task, and where.

A poll, cancel or list must reach the upstream that created the task, only the
submitting key may see it, and a task is metered once. The gateway therefore
records every task id it sees created, with its key, model and upstream.

`TaskStore` is the interface; `SqliteTaskStore` is the embedded default (one
file on local disk, survives restarts; its metering claims are in
`state.local.LocalStore`). A shared backend for several replicas implements
the same protocol: every operation is a single-key read or write, and
`claim_metering` is one atomic compare-and-set, so it maps onto Redis
(`SET NX`) as directly as onto SQL (`UPDATE ... WHERE metered = 0`). A claim
is pending until `finish_metering` (see `proxy.state.Claim`), and
`pending_claims` / `take_over` let another process finish it if its owner
died in between.

SQLite calls run on one dedicated thread that owns the connection: they never
block the event loop, and there is no connection sharing across threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from proxy.state import Claim

T = TypeVar("T")

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task the gateway saw created. `meta` is an opaque JSON string for front ends."""

    task_id: str
    key: str
    model: str
    upstream: str
    route: str
    created_at: float
    status: str = "PENDING"
    metered: bool = False
    meta: str | None = None
    # When the gateway polls it by itself if no one else has seen it final
    # (the reconciler); None: as soon as the reconciler looks.
    next_check: float | None = None


class TaskStore(Protocol):
    async def put(self, record: TaskRecord) -> None:
        """Record a newly created task (idempotent on task_id)."""

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record, or None when the gateway never saw this id."""

    async def set_status(self, task_id: str, status: str) -> None:
        """Remember the last status a poll showed."""

    async def claim_metering(self, task_id: str, claim: Claim | None = None) -> bool:
        """True exactly once per task, for the caller that must count its images. With
        `claim` the claim stays pending until `finish_metering`; without, it is done."""

    async def finish_metering(self, task_id: str, claim: Claim) -> bool:
        """Pending `claim` -> done, once its images are counted (compare-and-set)."""

    async def take_over(self, task_id: str, old: Claim, new: Claim) -> bool:
        """Pending `old` -> pending `new` (compare-and-set): of several processes
        finishing a dead owner's claim, exactly one wins."""

    async def pending_claims(self, before: float, limit: int) -> list[tuple[str, Claim]]:
        """Up to `limit` claims still pending that were made before `before`."""

    async def due(self, now: float, limit: int, lease: float) -> list[TaskRecord]:
        """Up to `limit` unfinished tasks whose background poll is due at `now`, oldest
        check first. Each is leased: its next check moves to `now + lease` in the same
        step, so another process (replica or worker) does not poll it meanwhile."""

    async def reschedule(self, task_id: str, at: float) -> None:
        """The next background poll of an unfinished task is at `at`."""

    async def count_due(self, now: float) -> int:
        """Unfinished tasks whose background poll is due (the backlog gauge)."""

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
        """One page of a key's tasks, newest first, and the total matching."""

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id    TEXT PRIMARY KEY,
    key        TEXT NOT NULL,
    model      TEXT NOT NULL,
    upstream   TEXT NOT NULL,
    route      TEXT NOT NULL,
    created_at REAL NOT NULL,
    status     TEXT NOT NULL,
    metered    INTEGER NOT NULL DEFAULT 0,
    meta       TEXT,
    next_check REAL,
    claim      TEXT,   -- the metering claim's `Claim.encode()`, pending and done
    claimed_at REAL,
    handed     TEXT    -- the outage spool: the process writing this row to Redis now
);
CREATE INDEX IF NOT EXISTS tasks_by_key ON tasks (key, created_at);
"""
# `metered`: 0 unclaimed, 1 counted (by this file's processes), 2 claimed and pending
# (`claim` says what to count), 3 claimed elsewhere (a copy of a Redis record).
# Older files lack the columns after meta.
_MIGRATIONS = tuple(
    (column, f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
    for column, kind in (
        ("next_check", "REAL"),
        ("claim", "TEXT"),
        ("claimed_at", "REAL"),
        ("handed", "TEXT"),
    )
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS tasks_open ON tasks (next_check) "
    "WHERE status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELED', 'UNKNOWN')",
    "CREATE INDEX IF NOT EXISTS tasks_pending ON tasks (claimed_at) WHERE metered = 2",
)
COLUMNS = "task_id, key, model, upstream, route, created_at, status, metered, meta, next_check"
_NOT_FINAL = "status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELED', 'UNKNOWN')"


class SqliteTaskStore:
    """The embedded task store: SQLite in WAL mode on local disk."""

    # DashScope forgets tasks after 24 h; keep ours a little longer, then purge.
    RETENTION_SECONDS = 48 * 3600

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._puts = 0

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        # WAL + synchronous=NORMAL: durable across process crashes (what a
        # restart needs) without an fsync per write.
        _set_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        have = {str(r[1]) for r in conn.execute("PRAGMA table_info(tasks)")}
        for column, ddl in _MIGRATIONS:
            if column not in have:
                try:
                    conn.execute(ddl)
                except sqlite3.OperationalError as exc:  # a sibling worker added it first
                    if "duplicate column" not in str(exc):
                        raise
        for index in _INDEXES:
            conn.execute(index)
        self._conn = conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("task store is not open")
        return self._conn

    async def put(self, record: TaskRecord, metered: int | None = None) -> None:
        """Record `record` (`metered`: the column's value, default its `metered` flag)."""
        self._puts += 1
        purge = self._puts % 1000 == 0
        flag = int(record.metered) if metered is None else metered

        def op() -> None:
            db = self._db()
            db.execute(
                f"INSERT OR IGNORE INTO tasks ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (
                    record.task_id,
                    record.key,
                    record.model,
                    record.upstream,
                    record.route,
                    record.created_at,
                    record.status,
                    flag,
                    record.meta,
                    record.next_check,
                ),
            )
            if purge:
                db.execute(
                    "DELETE FROM tasks WHERE created_at < ?",
                    (time.time() - self.RETENTION_SECONDS,),
                )

        await self._run(op)

    async def get(self, task_id: str) -> TaskRecord | None:
        def op() -> TaskRecord | None:
            row = (
                self._db()
                .execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (task_id,))  # noqa: S608
                .fetchone()
            )
            return record_of_row(row) if row else None

        return await self._run(op)

    async def set_status(self, task_id: str, status: str) -> None:
        def op() -> None:
            self._db().execute(
                "UPDATE tasks SET status = ? WHERE task_id = ? AND status != ?",
                (status, task_id, status),
            )

        await self._run(op)

    async def due(self, now: float, limit: int, lease: float) -> list[TaskRecord]:
        def op() -> list[TaskRecord]:
            # One statement: SQLite runs it under its single write lock, so two
            # workers sharing the file never lease the same task.
            rows = (
                self._db()
                .execute(
                    f"UPDATE tasks SET next_check = ? WHERE task_id IN ("  # noqa: S608
                    f"SELECT task_id FROM tasks WHERE {_NOT_FINAL} "
                    "AND COALESCE(next_check, 0) <= ? ORDER BY next_check LIMIT ?) "
                    f"RETURNING {COLUMNS}",
                    (now + lease, now, limit),
                )
                .fetchall()
            )
            return [record_of_row(r) for r in rows]

        return await self._run(op)

    async def reschedule(self, task_id: str, at: float) -> None:
        def op() -> None:
            self._db().execute("UPDATE tasks SET next_check = ? WHERE task_id = ?", (at, task_id))

        await self._run(op)

    async def count_due(self, now: float) -> int:
        """Unfinished tasks whose background poll is due (for the backlog gauge)."""

        def op() -> int:
            sql = f"SELECT COUNT(*) FROM tasks WHERE {_NOT_FINAL} AND COALESCE(next_check, 0) <= ?"  # noqa: S608
            return int(self._db().execute(sql, (now,)).fetchone()[0])

        return await self._run(op)

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
        where = ["key = ?"]
        args: list[object] = [key]
        for clause, value in (
            ("model = ?", model),
            ("status = ?", status),
            ("created_at >= ?", since),
            ("created_at <= ?", until),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        cond = " AND ".join(where)

        def op() -> tuple[list[TaskRecord], int]:
            db = self._db()
            # `cond` is built from the literal clauses above; values are bound.
            count_sql = "SELECT COUNT(*) FROM tasks WHERE " + cond  # noqa: S608
            order = "ORDER BY created_at DESC LIMIT ? OFFSET ?"
            page_sql = f"SELECT {COLUMNS} FROM tasks WHERE {cond} {order}"  # noqa: S608
            total = db.execute(count_sql, args).fetchone()[0]
            rows = db.execute(page_sql, [*args, limit, offset]).fetchall()
            return [record_of_row(r) for r in rows], int(total)

        return await self._run(op)

    async def close(self) -> None:
        def op() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(op)
        self._executor.shutdown(wait=True)


def _set_wal(conn: sqlite3.Connection, attempts: int = 250) -> None:
    """Switch to WAL. Workers opening a fresh file at the same moment (`server.workers`)
    make this fail with "database is locked" at once -- SQLite skips the busy
    handler for this lock -- so retry for up to ~5 s."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02)


def record_of_row(row: tuple[object, ...]) -> TaskRecord:
    """The record of a row selected with `COLUMNS`."""
    task_id, key, model, upstream, route, created_at, status, metered, meta, next_check = row
    return TaskRecord(
        str(task_id),
        str(key),
        str(model),
        str(upstream),
        str(route),
        float(created_at),  # type: ignore[arg-type]
        str(status),
        bool(metered),
        None if meta is None else str(meta),
        None if next_check is None else float(next_check),  # type: ignore[arg-type]
    )
