"""A gateway killed with SIGKILL while clients poll finished tasks loses no count and doubles none.

Between the once-per-task metering claim and the usage-ledger line there is a moment where a
`kill -9` used to lose the task for good (claimed, so never counted again; never written). No
hook makes it happen: many finished tasks are polled at once, so claims are being made all the
time, and the gateway is killed at a random moment, several times. After each restart every task
is polled again and the ledger must hold exactly one line per task the simulator generated.
Local (SQLite) and Redis state alike.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.redis_support import ledger_lines, poll_task, sim_images
from tests.resilience_support import IG, A, GatewayProcess, body, team_a_yaml
from tests.support import Live

ASYNC = {"X-DashScope-Async": "enable"}
MODEL = "wan2.6-t2i"
ROUNDS = 6
TASKS_PER_ROUND = 150


def config(sim: Live, tmp_path: Path, state: str) -> str:
    return team_a_yaml(
        sim.url,
        usage_log=tmp_path / "usage.jsonl",
        state=f"  path: {tmp_path / 'state.db'}\n{state}",
        extra="tasks:\n  reconcile: false",
    )


def submit_many(gw: GatewayProcess, n: int) -> list[str]:
    ids: list[str] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        for _ in range(count):
            r = requests.post(
                gw.url + IG, json=body(model=MODEL, n=1), headers={**A, **ASYNC}, timeout=10
            )
            assert r.status_code == 200, r.text
            with lock:
                ids.append(str(r.json()["output"]["task_id"]))

    threads = [threading.Thread(target=worker, args=(n // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids


def poll_all(gw: GatewayProcess, ids: list[str], *, stop: threading.Event | None = None) -> None:
    """Poll every task to SUCCEEDED and once more, eight clients at once; with `stop`, give up
    as soon as the gateway is gone."""
    work: queue.Queue[str] = queue.Queue()
    for task_id in ids:
        work.put(task_id)

    def client() -> None:
        while True:
            try:
                task_id = work.get_nowait()
            except queue.Empty:
                return
            for _ in range(2):
                deadline = time.monotonic() + 20
                while True:
                    code, status = poll_task(gw.url, task_id, A)
                    if code == 200 and status == "SUCCEEDED":
                        break
                    if code == 0 and stop is not None:
                        return  # killed
                    assert time.monotonic() < deadline, (task_id, code, status)
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_kill_9_while_polling_loses_and_doubles_nothing(
    backend: str, sim: Live, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = ""
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        state = f"  backend: redis\n  url: {server.url}"
    text = config(sim, tmp_path, state)
    rng = random.Random(11)
    gw = GatewayProcess(text, tmp_path, "gw0")
    ids: list[str] = []
    before = sim_images(sim.url)
    try:
        for round_ in range(1, ROUNDS + 1):
            batch = submit_many(gw, TASKS_PER_ROUND)
            ids += batch
            time.sleep(1.0)  # all SUCCEEDED in the simulator: every first poll claims
            stop = threading.Event()
            clients = threading.Thread(target=poll_all, args=(gw, batch), kwargs={"stop": stop})
            clients.start()
            time.sleep(rng.uniform(0.1, 0.5))
            gw.proc.kill()  # SIGKILL: no shutdown, no flush
            gw.proc.wait(10)
            stop.set()
            clients.join()
            gw.stop()
            gw = GatewayProcess(text, tmp_path, f"gw{round_}")
            poll_all(gw, batch)
        generated = sim_images(sim.url) - before
        wanted = set(ids)

        def ledger() -> list[dict[str, object]]:
            return [
                ln for ln in ledger_lines([tmp_path / "usage.jsonl"]) if ln["task_id"] in wanted
            ]

        deadline = time.monotonic() + 15  # pending claims are finished at startup or soon after
        while sum(int(str(ln["images"])) for ln in ledger()) < generated:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        lines = ledger()
        per_task: dict[object, int] = {}
        for ln in lines:
            per_task[ln["task_id"]] = per_task.get(ln["task_id"], 0) + 1
        images = sum(int(str(ln["images"])) for ln in lines)
        summary = (
            f"{backend}: generated {generated}, ledger {images} in {len(lines)} lines, "
            f"tasks missing {len(wanted - set(per_task))}, "
            f"doubled {sum(1 for n in per_task.values() if n > 1)}"
        )
        print(summary)
        assert generated == len(ids), summary
        assert len(lines) == generated and set(per_task) == wanted, summary
        assert all(n == 1 for n in per_task.values()), summary
    finally:
        gw.stop()
