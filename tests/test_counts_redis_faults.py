"""Exact counts through Redis faults, over real sockets: a real `redis-server`, gateway processes,
the simulator as DashScope.

- Tasks spooled during an outage and polled concurrently while the replica hands them back to
  Redis are counted once (one replica, and two).
- A clean Redis restart is not an outage: no 503, no task forgotten, no flapping.
- The "counted twice" warning is exact: silent for a claim another replica made before the
  outage, loud for a real double (a replica cut off from Redis while another counts the task).

Counted means the sum of `dashscope_proxy_images_total` over the replicas and the usage-ledger
lines, both compared with the images the simulator generated.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import requests

from tests.conftest import KEY_A, UPSTREAM_KEY
from tests.redis_support import (
    CutProxy,
    RedisServer,
    ledger_lines,
    poll_task,
    sim_images,
)
from tests.resilience_support import IG, A, GatewayProcess, body
from tests.support import Live

ASYNC = {"X-DashScope-Async": "enable"}
MODEL = "wan2.6-t2i"


def replica_config(sim: Live, redis_url: str, tmp_path: Path, i: int, tasks: str) -> str:
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {tmp_path / f"usage{i}.jsonl"}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
state:
  backend: redis
  url: {redis_url}
  path: {tmp_path / f"spool{i}.db"}
tasks:
  {tasks}
"""


def replicas(
    sim: Live, redis_urls: Sequence[str], tmp_path: Path, tasks: str = "reconcile: false"
) -> list[GatewayProcess]:
    return [
        GatewayProcess(replica_config(sim, url, tmp_path, i, tasks), tmp_path, f"gw{i}")
        for i, url in enumerate(redis_urls, start=1)
    ]


def ledgers(tmp_path: Path, count: int) -> list[Path]:
    return [tmp_path / f"usage{i}.jsonl" for i in range(1, count + 1)]


def submit(gw: GatewayProcess) -> str:
    r = requests.post(gw.url + IG, json=body(model=MODEL, n=1), headers={**A, **ASYNC}, timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["output"]["task_id"])


def counted(gws: Sequence[GatewayProcess]) -> float:
    return sum(gw.metric("dashscope_proxy_images_total", key="team-a", model=MODEL) for gw in gws)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def poll_until_answered(url: str, task_id: str, want: str | None = "SUCCEEDED") -> str:
    """Poll until a 200 (and `want`, if given); 503s and refused connections are retried."""
    deadline = time.monotonic() + 20
    while True:
        code, status = poll_task(url, task_id, A)
        if code == 200 and status is not None and (want is None or status == want):
            return status
        assert code in (0, 200, 503), (code, status)
        assert time.monotonic() < deadline, (task_id, code, status)
        time.sleep(0.05)


def poll_spread(
    gws: Sequence[GatewayProcess], ids: Sequence[str], *, threads: int, spread: float
) -> None:
    """Each task polled to SUCCEEDED by several client threads, first polls spread over
    `spread` seconds (so some land while a replica hands its spool back to Redis), then once
    more, all at once; each poll through a random replica."""
    rng = random.Random(7)
    errors: list[BaseException] = []

    def run(plan: list[tuple[float, str, int]]) -> None:
        start = time.monotonic()

        def client(part: list[tuple[float, str, int]]) -> None:
            try:
                for offset, task_id, replica in part:
                    wait = start + offset - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    poll_until_answered(gws[replica].url, task_id)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        workers = [
            threading.Thread(target=client, args=(plan[k::threads],)) for k in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, errors[0]

    run([(i * spread / len(ids), t, rng.randrange(len(gws))) for i, t in enumerate(ids)])
    run([(0.0, t, rng.randrange(len(gws))) for t in ids])


def assert_counted_once(
    gws: Sequence[GatewayProcess], paths: Sequence[Path], ids: Sequence[str], generated: int
) -> None:
    """Metric, ledger and simulator agree, and every task has exactly one ledger line."""
    expected = len(ids)

    def settled() -> bool:
        return counted(gws) >= generated

    wait_until(settled, "the counts to catch up")
    time.sleep(1.5)  # nothing more arrives late (a double would)
    lines = [ln for ln in ledger_lines(paths) if ln.get("task_id") in set(ids)]
    per_task = dict.fromkeys(ids, 0)
    for ln in lines:
        per_task[ln["task_id"]] += 1
    doubled = sorted(t for t, n in per_task.items() if n > 1)
    missing = sorted(t for t, n in per_task.items() if n == 0)
    summary = (
        f"generated {generated}, metric {counted(gws)}, ledger {sum(ln['images'] for ln in lines)}"
        f" in {len(lines)} lines; doubled {len(doubled)}, missing {len(missing)}"
    )
    print(summary)
    assert generated == expected, summary
    assert counted(gws) == generated, summary
    assert sum(ln["images"] for ln in lines) == generated, summary
    assert not doubled and not missing, summary


def outage_cycle(
    gws: Sequence[GatewayProcess], redis_server: RedisServer, sim: Live, n: int
) -> tuple[list[str], int]:
    """Redis stopped, `n` tasks submitted over the replicas, Redis started, every task polled
    concurrently while the replicas push their spools. Returns the ids and the images the
    simulator generated for them."""
    before = sim_images(sim.url)
    redis_server.stop()
    ids = [submit(gws[i % len(gws)]) for i in range(n)]
    time.sleep(1.0)  # every task SUCCEEDED in the simulator (0.5 s + 0.3 s)
    redis_server.start()
    poll_spread(gws, ids, threads=8, spread=1.2)
    return ids, sim_images(sim.url) - before


@pytest.mark.parametrize("count", [1, 2], ids=["one-replica", "two-replicas"])
def test_tasks_spooled_during_an_outage_are_counted_once(
    count: int, sim: Live, redis_server: RedisServer, tmp_path: Path
) -> None:
    gws = replicas(sim, [redis_server.url] * count, tmp_path)
    try:
        ids: list[str] = []
        generated = 0
        for _ in range(2):  # two outages: the push races the polls each time
            cycle_ids, cycle_generated = outage_cycle(gws, redis_server, sim, 150)
            ids += cycle_ids
            generated += cycle_generated
        assert_counted_once(gws, ledgers(tmp_path, count), ids, generated)
        for gw in gws:
            assert "counted twice" not in gw.log_path.read_text()
    finally:
        for gw in gws:
            gw.stop()


def down_lines(gw: GatewayProcess) -> int:
    return gw.log_path.read_text().count("redis unreachable")


def test_a_clean_redis_restart_is_not_an_outage(
    sim: Live, redis_server: RedisServer, tmp_path: Path
) -> None:
    gws = replicas(sim, [redis_server.url] * 2, tmp_path, tasks="reconcile_after_seconds: 60")
    try:
        # Warm both pools: concurrent requests leave several pooled connections per replica.
        before: list[str] = []
        lock = threading.Lock()

        def warm(k: int) -> None:
            for i in range(6):
                task_id = submit(gws[(k + i) % 2])
                with lock:
                    before.append(task_id)

        warmers = [threading.Thread(target=warm, args=(k,)) for k in range(6)]
        for w in warmers:
            w.start()
        for w in warmers:
            w.join()
        time.sleep(1.0)
        for task_id in before:
            for gw in gws:
                poll_until_answered(gw.url, task_id)

        # Tasks keep arriving while Redis restarts.
        around: list[str] = []
        stop = threading.Event()

        def submitter() -> None:
            i = 0
            while not stop.is_set():
                around.append(submit(gws[i % 2]))
                i += 1
                time.sleep(0.02)

        thread = threading.Thread(target=submitter)
        thread.start()
        time.sleep(0.3)
        redis_server.restart()
        time.sleep(0.3)
        stop.set()
        thread.join()

        restarted = time.monotonic()

        def both_up() -> bool:
            return all(gw.metric("dashscope_proxy_state_backend_up") == 1 for gw in gws)

        wait_until(both_up, "both backends to be up again", timeout=5)
        assert time.monotonic() - restarted < 2.0
        downs = [down_lines(gw) for gw in gws]

        # 200 polls right after the restart, over both replicas, four clients at once.
        codes: list[int] = []
        ups: list[float] = []

        def poller(k: int) -> None:
            for i in range(50):
                task_id = before[(k * 50 + i) % len(before)]
                code, _ = poll_task(gws[(k + i) % 2].url, task_id, A)
                codes.append(code)

        pollers = [threading.Thread(target=poller, args=(k,)) for k in range(4)]
        for p in pollers:
            p.start()
        while any(p.is_alive() for p in pollers):
            ups += [gw.metric("dashscope_proxy_state_backend_up") for gw in gws]
            time.sleep(0.05)
        for p in pollers:
            p.join()
        assert len(codes) == 200
        assert codes.count(503) == 0 and set(codes) == {200}, sorted(set(codes))
        assert set(ups) == {1.0}, ups
        assert [down_lines(gw) for gw in gws] == downs  # never flipped again

        # Every task accepted around the restart is answered by both replicas, never UNKNOWN.
        assert around
        for task_id in around + before:
            for gw in gws:
                assert poll_until_answered(gw.url, task_id, want=None) != "UNKNOWN"
    finally:
        for gw in gws:
            gw.stop()


def test_the_counted_twice_warning_is_exact(
    sim: Live, redis_server: RedisServer, tmp_path: Path
) -> None:
    proxy = CutProxy(redis_server.port)
    gw1, gw2 = replicas(sim, [proxy.url, redis_server.url], tmp_path)
    paths = ledgers(tmp_path, 2)
    try:
        # A task counted by gw2; gw1 reads it (claimed) just before Redis goes away and settles
        # its slow poll during the outage: not counted again, and no warning.
        counted_elsewhere = submit(gw2)
        poll_until_answered(gw2.url, counted_elsewhere)
        r = requests.post(
            sim.url + "/_sim/faults", json={"fault": "slow=1.5", "polls": True}, timeout=5
        )
        assert r.status_code == 200
        slow: list[tuple[int, str | None]] = []
        t = threading.Thread(target=lambda: slow.append(poll_task(gw1.url, counted_elsewhere, A)))
        t.start()
        time.sleep(0.5)
        redis_server.stop()
        t.join()
        assert slow == [(200, "SUCCEEDED")]
        redis_server.start()
        wait_until(lambda: gw1.metric("dashscope_proxy_state_backend_up") == 1, "gw1 up")
        wait_until(lambda: "wrote 1 task(s)" in gw1.log_path.read_text(), "gw1's push")
        time.sleep(0.5)
        lines = [ln for ln in ledger_lines(paths) if ln["task_id"] == counted_elsewhere]
        assert len(lines) == 1, lines
        assert "counted twice" not in gw1.log_path.read_text()

        # A real double: gw1 cut off from Redis (gw2 is not) counts a task it read a moment
        # before, while gw2 counts it too. Said once, naming the task.
        doubled = submit(gw2)
        time.sleep(1.0)
        r = requests.post(
            sim.url + "/_sim/faults", json={"fault": "slow=1.5", "polls": True}, timeout=5
        )
        assert r.status_code == 200
        slow.clear()
        t = threading.Thread(target=lambda: slow.append(poll_task(gw1.url, doubled, A)))
        t.start()
        time.sleep(0.5)
        proxy.cut()
        poll_until_answered(gw2.url, doubled)
        t.join()
        assert slow == [(200, "SUCCEEDED")]
        proxy.restore()
        wait_until(lambda: gw1.metric("dashscope_proxy_state_backend_up") == 1, "gw1 up")
        wait_until(lambda: "counted twice" in gw1.log_path.read_text(), "the warning")
        lines = [ln for ln in ledger_lines(paths) if ln["task_id"] == doubled]
        assert len(lines) == 2, lines
        warnings = [ln for ln in gw1.log_path.read_text().splitlines() if "counted twice" in ln]
        assert len(warnings) == 1 and doubled in warnings[0], warnings
        assert "counted twice" not in gw2.log_path.read_text()
    finally:
        for gw in (gw1, gw2):
            gw.stop()
        proxy.close()
