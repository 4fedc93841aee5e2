"""Kept answers of `Idempotency-Key` requests: the claim, the answer, and where they live.

An entry is keyed by `scope` (a digest of the gateway key's name and the client's
`Idempotency-Key`, so no client text is ever part of a key name) and holds the
request content's digest, the claim's `token` and lease, and once the request has
been answered, the answer (`KeptAnswer`: status, headers, body).

`claim` is the one atomic step: it either writes a running entry for the caller
(None) or returns what was there, and two processes claiming the same scope at
the same instant never both get None. With the local backend that is one SQLite
transaction (one upsert statement under SQLite's write lock, so workers sharing the file are
serialised too);
with Redis one Lua script (`proxy.state.redis.idempotency`). `keep` and
`release` act only on the caller's own claim (its token).

Deliberately not here: what is kept or replayed and when (`proxy.core.idempotency`).
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.jsonutil import dumps, loads

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    """What the first request's client received: status, the headers worth replaying, body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def encode(self) -> str:
        """One text value (Redis answers text): JSON, the body in base64."""
        return dumps(
            {
                "status": self.status,
                "headers": [list(h) for h in self.headers],
                "body": base64.b64encode(self.body).decode("ascii"),
            }
        ).decode("utf-8")

    @classmethod
    def decode(cls, text: str | None) -> KeptAnswer | None:
        """The answer `encode` wrote, or None for anything else."""
        if not text:
            return None
        try:
            data: Any = loads(text)
            headers = tuple((str(k), str(v)) for k, v in data["headers"])
            return cls(int(data["status"]), headers, base64.b64decode(data["body"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class Entry:
    """What a scope holds: the first request's content digest, and its answer once kept
    (None while it runs; `lease_until` says until when it counts as running)."""

    fingerprint: str
    lease_until: float
    answer: KeptAnswer | None


class IdempotencyStore(Protocol):
    async def claim(
        self, scope: str, fingerprint: str, token: str, lease: float, ttl: float
    ) -> Entry | None:
        """Atomically: None when `token` now holds `scope` (running for `lease` seconds,
        the entry kept `ttl` seconds), else the entry found there."""

    async def keep(self, scope: str, token: str, answer: KeptAnswer, ttl: float) -> bool:
        """Store the answer of `token`'s claim, kept `ttl` seconds from now."""

    async def release(self, scope: str, token: str) -> None:
        """Forget `token`'s claim (still running, nothing kept): a retry runs anew."""

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    scope       TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    token       TEXT NOT NULL,
    lease_until REAL NOT NULL,
    expires_at  REAL NOT NULL,
    answer      TEXT            -- KeptAnswer.encode(); NULL while the request runs
);
"""


class SqliteIdempotency:
    """`IdempotencyStore` in the state file (`state.path`), on its own connection and
    thread: survives restarts, shared by workers on one host."""

    PURGE_EVERY = 1000  # claims between deletions of expired entries

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idempotency")
        self._conn: sqlite3.Connection | None = None
        self._claims = 0

    async def open(self) -> None:
        def op() -> None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA synchronous=NORMAL")  # the task store set WAL on the file
            conn.executescript(_SCHEMA)
            self._conn = conn

        await self._run(op)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("idempotency store is not open")
        return self._conn

    async def claim(
        self, scope: str, fingerprint: str, token: str, lease: float, ttl: float
    ) -> Entry | None:
        self._claims += 1
        purge = self._claims % self.PURGE_EVERY == 0

        def op() -> Entry | None:
            db = self._db()
            now = time.time()
            if purge:
                db.execute("DELETE FROM idempotency WHERE expires_at < ?", (now,))
            # One statement, so one transaction: a new scope (or an expired one) is taken,
            # anything else is left alone. SQLite's write lock makes it atomic for every
            # connection to the file (workers), so exactly one claim wins.
            won = db.execute(
                "INSERT INTO idempotency VALUES (?,?,?,?,?,NULL) ON CONFLICT(scope) DO UPDATE "
                "SET fingerprint = excluded.fingerprint, token = excluded.token, "
                "lease_until = excluded.lease_until, expires_at = excluded.expires_at, "
                "answer = NULL WHERE idempotency.expires_at < ?",
                (scope, fingerprint, token, now + lease, now + max(ttl, lease), now),
            ).rowcount
            if won == 1:
                return None
            sql = "SELECT fingerprint, lease_until, answer FROM idempotency WHERE scope = ?"
            row = db.execute(sql, (scope,)).fetchone()
            if row is None:  # expired and purged between the two statements: take it
                return op()
            return Entry(str(row[0]), float(row[1]), KeptAnswer.decode(row[2]))

        return await self._run(op)

    async def keep(self, scope: str, token: str, answer: KeptAnswer, ttl: float) -> bool:
        text = answer.encode()

        def op() -> bool:
            sql = "UPDATE idempotency SET answer = ?, expires_at = ? WHERE scope = ? AND token = ?"
            return self._db().execute(sql, (text, time.time() + ttl, scope, token)).rowcount == 1

        return await self._run(op)

    async def release(self, scope: str, token: str) -> None:
        def op() -> None:
            sql = "DELETE FROM idempotency WHERE scope = ? AND token = ? AND answer IS NULL"
            self._db().execute(sql, (scope, token))

        await self._run(op)

    async def close(self) -> None:
        def op() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(op)
        self._executor.shutdown(wait=True)
