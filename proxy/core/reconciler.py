"""The reconciler: every task DashScope bills is counted, even if nobody polls it.

DashScope bills an async task whether or not its client ever asks for the
result (submit-and-forget clients, LiteLLM calling `/aliyun/v1` with an async
model). So the gateway polls, by itself, every task it recorded that is not
final: first `tasks.reconcile_after_seconds` after the task was created, then
at intervals that double with the task's age (60 s, 60 s, 120 s, 240 s, ...)
up to `tasks.reconcile_max_interval_seconds`, until DashScope reports it final
or forgets it (`UNKNOWN`, after its 24 h). The first SUCCEEDED it sees is
metered through `settlement.settle_task`, the same once-per-task claim client
polls and list refreshes use, so whoever sees SUCCEEDED first counts it and
nobody counts it twice -- across restarts (the schedule is in the state
store) and replicas (each due task is leased by one process at a time, and
the metering claim is atomic in SQLite and in Redis).

Pacing: at most `tasks.reconcile_polls_per_second` polls start per second and
`tasks.reconcile_concurrency` run at once per process, each through the
upstream's own connection and concurrency cap (`pinned.call_pinned`), so
10,000 outstanding tasks are spread out instead of bursting DashScope. These
polls never count against a key's rate limit and are counted on their own in
`dashscope_proxy_reconciler_polls_total{upstream,outcome}`.

Pending claims: a process killed between winning a task's metering claim and
marking it counted leaves the claim pending (`proxy.state.Claim`). At startup
and every `FINISH_SECONDS` this process finishes the pending claims whose
owner is gone -- provably (a process of this host that no longer runs, checked
once the claim is `MIN_PENDING_SECONDS` old) or presumably (older than
`tasks.pending_claim_seconds`, default 30) -- through `settlement.finish_claim`,
whether or not the reconciler polls (`tasks.reconcile: false`). The owner may
have died after writing its usage-log line but before marking the claim done:
when the claim names this process's ledger and host, the ledger's tail is read
first and such a claim is marked done without counting it again.

Deliberately not here: what a poll answer means for counts (`settlement`) and
where the schedule is kept (`tasks.TaskStore.due` / `reschedule`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.config.model import TasksConfig
from proxy.core.settlement import COUNTED_UNDONE, COUNTING, Origin, finish_claim, settle_task
from proxy.errors import GatewayError
from proxy.jsonutil import loads
from proxy.metering import facts_from_bytes
from proxy.runtime import METRICS, RUNTIME, TASKS
from proxy.state import Claim, owner_gone, owner_id, same_host
from proxy.state.tasks import TERMINAL, TaskRecord
from proxy.upstream.call import key_headers
from proxy.upstream.pinned import call_pinned

log = logging.getLogger(__name__)

ROUTE = "reconciler"  # the usage log's `route` for images this loop counted
# A leased task is not handed to another process for this long; the poll itself
# then reschedules it. Longer than any poll (the upstream's read timeout bounds it
# in practice; a task whose poll outlives the lease is merely polled twice).
LEASE_SECONDS = 120.0
# DashScope's task answers are a few KB.
MAX_ANSWER_BYTES = 1024 * 1024
IDLE_SECONDS = 1.0  # how often an idle reconciler looks for due tasks
FINISH_SECONDS = 2.0  # how often pending claims are looked at
# A live owner marks its claim done milliseconds after making it: one pending this long
# whose owner is provably gone is never one still being counted.
MIN_PENDING_SECONDS = 5.0
LEDGER_SCAN_BYTES = 64 * 1024 * 1024  # at most this much of the ledger's tail is read


def next_interval(age: float, config: TasksConfig) -> float:
    """Pure: seconds to the next background poll of a task `age` seconds old: doubling
    with age, never below the first delay nor above the cap."""
    return min(config.reconcile_max_interval_seconds, max(config.reconcile_after_seconds, age))


def outcome_of(status: int, task_status: str | None) -> str:
    """Pure: the `outcome` label of one background poll."""
    if status != 200 or task_status is None:
        return "error"
    if task_status == "SUCCEEDED":
        return "succeeded"
    if task_status == "UNKNOWN":
        return "unknown"
    if task_status in TERMINAL:
        return "ended"
    return "running"


class Reconciler:
    """One process's background poller (a cleanup context starts and stops it)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._running: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Forever: lease the due tasks, poll them at the configured pace."""
        next_start = 0.0
        while True:
            config = self._app[RUNTIME].current.config.tasks
            if not config.reconcile:
                await asyncio.sleep(IDLE_SECONDS)
                continue
            try:
                batch = await self._app[TASKS].due(
                    time.time(), self._batch_size(config), LEASE_SECONDS
                )
            except Exception:
                log.exception("reconciler: reading due tasks failed; retrying")
                await asyncio.sleep(IDLE_SECONDS)
                continue
            if not batch:
                await self._gauge()
                await asyncio.sleep(IDLE_SECONDS)
                continue
            spacing = 1.0 / config.reconcile_polls_per_second
            for record in batch:
                loop = asyncio.get_running_loop()
                wait = next_start - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                next_start = max(next_start, loop.time()) + spacing
                while len(self._running) >= config.reconcile_concurrency:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(self.poll(record))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    @staticmethod
    def _batch_size(config: TasksConfig) -> int:
        # About two seconds of polls: the lease must not expire before a leased
        # task gets its turn.
        return max(1, min(1000, int(config.reconcile_polls_per_second * 2)))

    async def _gauge(self) -> None:
        with contextlib.suppress(Exception):
            due = await self._app[TASKS].count_due(time.time())
            self._app[METRICS].reconciler_backlog.set(due)

    async def poll(self, record: TaskRecord) -> None:
        """Poll one task on the upstream that created it; settle and reschedule."""
        app = self._app
        rt = app[RUNTIME].current
        metrics = app[METRICS]
        now = time.time()
        retry_at = now + next_interval(now - record.created_at, rt.config.tasks)
        upstream = rt.router.by_name(record.upstream)
        if upstream is None:
            # Its upstream was removed from the config: keep the task (a reload may
            # bring it back) and look again later.
            metrics.reconciler_polls.labels(record.upstream[:64], "error").inc()
            await self._reschedule(record, retry_at)
            return
        status, facts = 0, None
        try:
            async with call_pinned(
                app,
                upstream,
                "tasks.get",
                "GET",
                f"/tasks/{record.task_id}",
                key_headers(upstream.api_key),
                None,
            ) as call:
                status = call.response.status
                body = await call.response.content.read(MAX_ANSWER_BYTES)
            facts = facts_from_bytes(body)
            origin = Origin(ROUTE, f"reconcile-{record.task_id}")
            await settle_task(app, origin, record, status, facts)
        except (GatewayError, aiohttp.ClientError, TimeoutError) as exc:
            log.info("reconciler: polling task %s failed (%s)", record.task_id, exc)
        except Exception:
            log.exception("reconciler: polling task %s failed", record.task_id)
        task_status = facts.task_status if facts is not None else None
        metrics.reconciler_polls.labels(upstream.name, outcome_of(status, task_status)).inc()
        if status == 200 and task_status in TERMINAL:
            return  # settled: final statuses are never due again
        await self._reschedule(record, retry_at)

    async def _reschedule(self, record: TaskRecord, at: float) -> None:
        try:
            await self._app[TASKS].reschedule(record.task_id, at)
        except Exception:
            log.exception("reconciler: rescheduling task %s failed", record.task_id)

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
        for task in list(self._running):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def finish_pending(app: web.Application) -> int:
    """Finish the claims left pending by owners that are gone; how many were finished."""
    rt = app[RUNTIME].current
    stale = rt.config.tasks.pending_claim_seconds
    ledger = rt.config.server.usage_log
    me = owner_id()
    now = time.time()
    due: list[tuple[str, Claim]] = []
    for task_id, claim in await app[TASKS].pending_claims(now - MIN_PENDING_SECONDS, 500):
        if claim.owner == me and task_id in COUNTING:
            continue  # being counted right now
        if claim.owner == me or owner_gone(claim.owner) or now - claim.at >= stale:
            due.append((task_id, claim))
    if not due:
        return 0
    # Which of them did their owner write to this ledger before dying?
    mine = {t for t, c in due if ledger and c.ledger == ledger and same_host(c.owner)}
    written: set[str] = set()
    if ledger and mine:
        since = min(c.at for _, c in due) - 60.0
        written = await asyncio.to_thread(ledger_has, ledger, mine, since)
    finished = 0
    for task_id, claim in due:
        # Counted here but not marked done (the store failed): never count it again.
        counted = task_id in written or (claim.owner == me and task_id in COUNTED_UNDONE)
        finished += await finish_claim(app, task_id, claim, written=counted)
    return finished


def ledger_has(path: str, task_ids: set[str], since: float) -> set[str]:
    """Which of `task_ids` have a line in the usage ledger at `path`: read backwards from
    its end until lines older than `since` (or `LEDGER_SCAN_BYTES`). Torn lines are
    skipped, as the ledger's readers should."""
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
    found: set[str] = set()
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a missing ledger holds nothing
    except OSError:
        return found
    with f:
        pos = end = f.seek(0, 2)
        head = b""
        while pos > 0 and end - pos < LEDGER_SCAN_BYTES and found != task_ids:
            size = min(65536, pos)
            pos -= size
            f.seek(pos)
            lines = (f.read(size) + head).split(b"\n")
            head = lines.pop(0) if pos > 0 else b""
            oldest = ""
            for raw in reversed(lines):
                try:
                    line = loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict):
                    if line.get("task_id") in task_ids:
                        found.add(str(line["task_id"]))
                    oldest = str(line.get("ts", oldest))
            if oldest and oldest[:19] < cutoff:
                break
    return found


async def finish_pending_forever(app: web.Application) -> None:
    """At startup, then every `FINISH_SECONDS`: `finish_pending`."""
    while True:
        try:
            await finish_pending(app)
        except Exception:
            log.exception("reconciler: finishing pending metering claims failed; retrying")
        await asyncio.sleep(FINISH_SECONDS)


RECONCILER = web.AppKey("reconciler", Reconciler)


async def reconciler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after the state and limits contexts): the background poller."""
    reconciler = Reconciler(app)
    app[RECONCILER] = reconciler
    tasks = [
        asyncio.create_task(reconciler.run()),
        asyncio.create_task(finish_pending_forever(app)),
    ]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await reconciler.stop()
