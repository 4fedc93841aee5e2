"""The `reconciler` row: the gateway polling, by itself, thousands of tasks nobody polls.

How: the gateway's SQLite state file is filled before it starts with N task
records (written by `proxy.tasks.SqliteTaskStore.put`, as a submit would) whose
first background poll is parked an hour ahead. Once the gateway runs and the
figures it is compared with are taken, one UPDATE makes every task due at once
(`trigger`): from then on the gateway's only work is the reconciler -- lease the
due tasks, `GET /api/v1/tasks/{id}` on the bench upstream (SUCCEEDED, one image,
at the first poll), settle, meter -- so its CPU time over that window, divided by
N, is the cost of one reconciled task, with no submit and no startup in it.

Figures, per run (a fresh gateway each):
- polls/s at a pace high enough that the gateway itself is the limit, from the
  usage ledger's timestamps of the reconciler's lines (10th to 90th percentile,
  so the first lease and the tail are left out);
- polls/s at the default pace (`tasks.reconcile_polls_per_second`) with the
  same N outstanding, over a window of `--duration` seconds: pacing holds;
- gateway CPU per reconciled task, and per plain proxied request measured in the
  same process just before (same-run ratio);
- images metered vs tasks x images per task: every task exactly once, or the
  scenario fails (every ledger line names a distinct task of the N, the image
  counter grew by exactly N x 1, every poll succeeded).
"""

from __future__ import annotations

import asyncio
import calendar
import json
import shutil
import sqlite3
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import TasksConfig
from proxy.state.tasks import SqliteTaskStore, TaskRecord

from .core import Bench, ScenarioResult, sync_request
from .procs import Proc

MODEL = "wan2.6-t2i"
ROUTE = "reconciler"  # the usage ledger's `route` of what the reconciler metered
IMAGES_PER_TASK = 1  # what bench.upstream's task answer reports (usage.image_count)
PARKED_SECONDS = 3600.0
# The ceiling pace: far above what one process reaches, so the gateway (CPU,
# `reconcile_concurrency`) is the limit, not the pacer.
CEILING_PACE = 100_000.0
CEILING_CONCURRENCY = 32


# ------------------------------------------------------------------- state file


def task_ids(n: int) -> list[str]:
    return [f"bench-reconcile-{i:06d}" for i in range(n)]


def populate(path: Path, n: int) -> None:
    """A state file with `n` open tasks of the key `bench`, polls parked an hour ahead."""

    async def fill() -> None:
        store = SqliteTaskStore(str(path))
        await store.open()
        now = time.time()
        try:
            ids = task_ids(n)
            for start in range(0, n, 500):
                await asyncio.gather(
                    *(
                        store.put(
                            TaskRecord(
                                task_id,
                                "bench",
                                MODEL,
                                "bench",
                                "image-generation",
                                now,
                                "PENDING",
                                next_check=now + PARKED_SECONDS,
                            )
                        )
                        for task_id in ids[start : start + 500]
                    )
                )
        finally:
            await store.close()

    asyncio.run(fill())


def trigger(path: Path) -> float:
    """Every open task in the (running gateway's) state file is due now; returns now."""
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
    try:
        now = time.time()
        conn.execute("UPDATE tasks SET next_check = ? WHERE metered = 0", (now,))
        return now
    finally:
        conn.close()


# ----------------------------------------------------------------- observation


def _epoch(ts: str, cache: dict[str, float]) -> float:
    """`2026-11-22T02:50:46.123Z` (the ledger's `ts`) as a Unix time."""
    whole = cache.get(ts[:19])
    if whole is None:
        whole = cache[ts[:19]] = float(calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")))
    return whole + int(ts[20:23]) / 1000.0


@dataclass
class LedgerTail:
    """The reconciler's lines of a gateway's usage ledger, read as they are appended."""

    path: Path
    times: list[float] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    images: int = 0
    _offset: int = 0
    _cache: dict[str, float] = field(default_factory=dict)

    def read(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            if event.get("route") == ROUTE:
                self.times.append(_epoch(event["ts"], self._cache))
                self.tasks.append(str(event["task_id"]))
                self.images += int(event["images"])
        return len(self.tasks)

    def wait(self, count: int, timeout: float, gw: Proc) -> int:
        """Read until `count` reconciler lines are in (or `timeout`, or the gateway died)."""
        deadline = time.monotonic() + timeout
        while self.read() < count and time.monotonic() < deadline and gw.alive():
            time.sleep(0.05)
        return len(self.tasks)


def scrape(port: int) -> dict[str, float]:
    """The image counter's sum and the reconciler's polls by outcome."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, float] = {"images": 0.0, "inflight": 0.0}
    for line in text.splitlines():
        if line.startswith("dashscope_proxy_inflight_requests{"):
            out["inflight"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("dashscope_proxy_images_total{"):
            out["images"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("dashscope_proxy_reconciler_polls_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[f"polls:{outcome}"] = out.get(f"polls:{outcome}", 0.0) + float(
                line.rsplit(" ", 1)[1]
            )
    return out


def settled(port: int, timeout: float = 10.0) -> dict[str, float]:
    """`scrape` once no request is in flight and the image counter has stopped moving.

    The load generator stops at its deadline with requests still open; the gateway
    finishes those and meters their images (a billed image counts even when its
    client has gone), so a baseline taken at once could miss one of them.
    """
    deadline = time.monotonic() + timeout
    last = scrape(port)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = scrape(port)
        if not now["inflight"] and now["images"] == last["images"]:
            return now
        last = now
    return last


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def _middle_rate(times: list[float]) -> float | None:
    """Events/s between the 10th and the 90th percentile of `times`."""
    ts = sorted(times)
    lo, hi = len(ts) // 10, len(ts) * 9 // 10
    if hi - lo < 2 or ts[hi - 1] <= ts[lo]:
        return None
    return (hi - 1 - lo) / (ts[hi - 1] - ts[lo])


# -------------------------------------------------------------------- scenario


def reconciler(b: Bench) -> ScenarioResult:
    n = b.s.reconcile_tasks
    default = TasksConfig()
    pace = default.reconcile_polls_per_second
    res = ScenarioResult(
        "reconciler", f"reconciler: {n:,} outstanding tasks polled by the gateway itself"
    )
    ceiling = res.metric(
        f"polls/s, pace {CEILING_PACE:,.0f}/s x{CEILING_CONCURRENCY}", "polls/s", ratio_to=None
    )
    paced = res.metric(
        f"polls/s, default pace {pace:g}/s x{default.reconcile_concurrency}",
        "polls/s",
        ratio_to="expected",
        target="0.9..1.1x expected",
        check=lambda _v, r: r is not None and 0.9 <= r <= 1.1,
    )
    cpu = res.metric(
        "CPU per reconciled task", "us", ratio_to="proxied request", higher_is_better=False
    )
    metered = res.metric(
        f"images metered (tasks x {IMAGES_PER_TASK})",
        "",
        ratio_to="expected",
        target="= expected",
        check=lambda _v, r: r == 1.0,
    )
    template = b.tmp / f"reconcile-{n}.db"
    t0 = time.monotonic()
    populate(template, n)
    res.notes.append(
        f"{n:,} task records written through SqliteTaskStore.put in "
        f"{time.monotonic() - t0:.1f} s, before the gateway starts; each is polled once "
        "(the bench upstream answers SUCCEEDED, 1 image)"
    )
    expected_ids = set(task_ids(n))
    common: dict[str, object] = {"reconcile_after_seconds": 0.01}
    for run in range(b.s.runs):
        # ---- the ceiling, CPU per task, and metering: all n tasks reconciled
        state = b.tmp / f"reconcile-run{run}.db"
        shutil.copyfile(template, state)
        tasks = common | {
            "reconcile_polls_per_second": CEILING_PACE,
            "reconcile_concurrency": CEILING_CONCURRENCY,
        }
        with b.gateway(tasks=tasks, state=state) as gw:
            b.warm(gw.port)
            c0 = gw.cpu_seconds()
            r = b.load(gw.port, [sync_request()], connections=64)
            if r["requests"]:
                cpu.add("proxied request", (gw.cpu_seconds() - c0) * 1e6 / r["requests"])
            tail = LedgerTail(Path(str(gw.extra["usage_log"])))
            tail.read()
            before = settled(gw.port)
            c0 = gw.cpu_seconds()
            started = trigger(state)
            tail.wait(n, max(60.0, n / 20), gw)
            used = gw.cpu_seconds() - c0
            wall = time.time() - started
            if not gw.alive():
                raise RuntimeError(f"the gateway died while reconciling: {gw.log_tail(800)}")
            tail.wait(n + 1, 0.3, gw)  # a task counted twice would show a little later
            after = _delta(scrape(gw.port), before)
        rate = _middle_rate(tail.times)
        ceiling.add("gateway", rate)
        cpu.add("gateway", used * 1e6 / n)
        images = after.get("images", 0.0)
        metered.add("gateway", images)
        metered.add("expected", n * IMAGES_PER_TASK)
        polls = {k.split(":", 1)[1]: int(v) for k, v in after.items() if k.startswith("polls:")}
        distinct = set(tail.tasks)
        problems = []
        if images != n * IMAGES_PER_TASK:
            problems.append(f"the image counter grew by {images:g}, not {n * IMAGES_PER_TASK}")
        if len(tail.tasks) != n or distinct != expected_ids:
            problems.append(
                f"the ledger has {len(tail.tasks)} reconciler lines for {len(distinct)} "
                f"distinct tasks ({len(expected_ids - distinct)} of {n} never metered, "
                f"{len(distinct - expected_ids)} unknown)"
            )
        if tail.images != n * IMAGES_PER_TASK:
            problems.append(f"the ledger counts {tail.images} images")
        if polls != {"succeeded": n}:
            problems.append(f"polls by outcome {polls}, not {{'succeeded': {n}}}")
        if problems:
            raise RuntimeError(
                f"reconciler run {run + 1}: {n} tasks x {IMAGES_PER_TASK} image not metered "
                "exactly once: " + "; ".join(problems)
            )
        if run == 0:
            span = max(tail.times) - min(tail.times)
            busy = f" ({used / span:.2f} CPU-s per second of polling)" if span > 0 else ""
            res.notes.append(
                f"run 1: {n:,} tasks reconciled {wall:.1f} s after being made due "
                f"(the idle reconciler looks every 1 s); gateway CPU {used:.2f} s{busy}; "
                f"+{images:g} images, polls {polls}, {len(distinct):,} distinct tasks "
                "in the usage ledger"
            )
        # ---- pacing: the default pace with the same n outstanding
        state = b.tmp / f"reconcile-paced-run{run}.db"
        shutil.copyfile(template, state)
        with b.gateway(tasks=common, state=state) as gw:
            tail = LedgerTail(Path(str(gw.extra["usage_log"])))
            trigger(state)
            if tail.wait(1, 10.0, gw) < 1:
                raise RuntimeError(f"no background poll within 10 s: {gw.log_tail(800)}")
            time.sleep(b.s.duration)
            tail.read()
        times = sorted(tail.times)
        if len(times) >= 3 and times[-1] > times[0]:
            paced.add("gateway", (len(times) - 1) / (times[-1] - times[0]))
            paced.add("expected", pace)
        if len(set(tail.tasks)) != len(tail.tasks):
            raise RuntimeError(
                f"reconciler run {run + 1} at the default pace: {len(tail.tasks)} ledger "
                f"lines for {len(set(tail.tasks))} distinct tasks"
            )
        if run == 0:
            res.notes.append(
                f"default pace: {len(times)} tasks reconciled over {times[-1] - times[0]:.1f} s "
                f"with {n - len(times):,} still due (rate from the usage ledger's timestamps)"
            )
    res.notes.append(
        "CPU per reconciled task = gateway CPU from making the tasks due to the last "
        "metered / tasks; proxied request = a plain sync request at 64 connections, "
        "same process, just before"
    )
    return res
