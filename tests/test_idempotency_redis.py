"""`Idempotency-Key` with `state.backend: redis`: two gateway processes sharing one real Redis
race the same key at the same instant, and exactly one request reaches DashScope."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import KEY_A
from tests.redis_support import RedisServer
from tests.resilience_support import MM, GatewayProcess, body, sim_model_calls, team_a_yaml
from tests.support import Live


@pytest.fixture
def pair(sim: Live, redis_server: RedisServer, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    gws = []
    for i in (1, 2):
        state = f"  backend: redis\n  url: {redis_server.url}\n  path: {tmp_path / f's{i}.db'}"
        text = team_a_yaml(sim.url, usage_log=tmp_path / f"u{i}.jsonl", state=state)
        gws.append(GatewayProcess(text, tmp_path, f"gw{i}"))
    yield gws
    for gw in gws:
        gw.stop()


def test_two_replicas_racing_one_key_run_it_once(pair: list[GatewayProcess], sim: Live) -> None:
    payload = body("a race [sim:slow=2]")
    headers = {"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "race-1"}
    start = threading.Barrier(6)
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def send(gw: GatewayProcess) -> None:
        start.wait()
        r = requests.post(gw.url + MM, json=payload, headers=headers, timeout=30)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=send, args=(pair[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One ran; the others were answered 409 while it ran (or, on a slow machine, arrived
    # after it ended and got its kept answer).
    ran_now = [
        r for r in answers if r.status_code == 200 and "Idempotency-Replayed" not in r.headers
    ]
    others = [r for r in answers if r not in ran_now]
    assert len(ran_now) == 1, [r.text for r in answers]
    assert all(r.status_code == 409 or r.headers.get("Idempotency-Replayed") for r in others)
    assert sum(r.status_code == 409 for r in others) >= 3
    assert sim_model_calls(sim) == 1
    [ran] = ran_now
    # Every replica now replays the one answer.
    for gw in pair:
        again = requests.post(gw.url + MM, json=payload, headers=headers, timeout=30)
        assert again.status_code == 200 and again.headers["Idempotency-Replayed"] == "true"
        assert again.json() == ran.json()
    assert sim_model_calls(sim) == 1
    replays = sum(
        gw.metric("dashscope_proxy_idempotent_replays_total", key="team-a") for gw in pair
    )
    assert replays == 2 + sum(1 for r in others if r.status_code == 200)
