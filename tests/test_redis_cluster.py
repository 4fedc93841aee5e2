"""`state.cluster: true`: the gateway on a real (one-node) Redis Cluster, every key under the
`{dsp}` hash tag in one slot: two gateway processes sharing tasks, metering, limits and the
reconciler's schedule; an outage of the cluster and the handover after it; and the key names
every command and script uses, recorded on the server (`MONITOR`), on a cluster and on a
single server (where they are the `dsp:` names deployments already have)."""

from __future__ import annotations

import ast
import re
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from proxy.config import ConfigError, parse_config
from proxy.state.redis.common import CLUSTER_PREFIX, PREFIX, Keys
from tests.redis_support import RedisServer
from tests.resilience_support import A, B, GatewayProcess, assert_no_secret, body
from tests.support import Live
from tests.topology_support import (
    UPSTREAM,
    C,
    ClusterNode,
    KeyRecorder,
    gateway_config,
    poll_until_succeeded,
    post,
    post_once_free,
    redis_cluster,
    submit,
    wait_until,
)

__all__ = ["redis_cluster"]  # the fixture, for this module's tests

REDIS_PACKAGE = Path(__file__).resolve().parent.parent / "proxy" / "state" / "redis"


def config(sim: Live, url: str, spool: Path, *, cluster: bool = True) -> str:
    return gateway_config(sim, f"url: {url}\n  cluster: {str(cluster).lower()}", spool)


def images(gws: list[GatewayProcess], key: str, model: str) -> float:
    return sum(gw.metric("dashscope_proxy_images_total", key=key, model=model) for gw in gws)


def test_two_gateways_share_a_cluster_every_key_in_one_slot(
    sim: Live, redis_cluster: ClusterNode, tmp_path: Path
) -> None:
    recorder = KeyRecorder(redis_cluster.port)
    gws = [
        GatewayProcess(config(sim, redis_cluster.url, tmp_path / f"s{i}.db"), tmp_path, f"gw{i}")
        for i in (1, 2)
    ]
    gw1, gw2 = gws
    try:
        for gw in gws:
            assert gw.metric("dashscope_proxy_state_backend_up") == 1
        # requests_per_minute: 4 for team-a, across both replicas.
        for gw in (gw1, gw2, gw1):
            assert post(gw, body(), A).status_code == 200
        task_id = submit(gw2, A)  # the 4th
        for gw in gws:
            r = post(gw, body(), A)
            assert r.status_code == 429 and r.json()["code"] == "Throttling.RateQuota", r.text
        # Submitted through gw2, polled through gw1 (and gw2): metered once.
        poll_until_succeeded(gw1, task_id, A)
        poll_until_succeeded(gw2, task_id, A)
        assert images(gws, "team-a", "wan2.6-t2i") == 1
        # team-b: one request at a time and 6 images a day, across replicas; slots released.
        assert post(gw1, body(n=4), B).status_code == 200
        r = post_once_free(gw2, body(n=3), B)
        assert r.status_code == 429 and r.json()["code"] == "Throttling.AllocationQuota", r.text
        slow: list[int] = []
        t = threading.Thread(
            target=lambda: slow.append(post(gw1, body("[sim:slow=1]"), B).status_code)
        )
        t.start()
        time.sleep(0.4)
        r = post(gw2, body(), B)
        assert r.status_code == 429 and "concurrent" in r.json()["message"], r.text
        t.join()
        assert slow == [200]
        assert post_once_free(gw2, body(), B).status_code == 200  # released: 6 of 6 used
        assert images(gws, "team-b", "qwen-image-2.0") == 6
        # Nobody polls team-c's task: the reconciler (one of the two) leases it and counts it.
        lone = submit(gw1, C)
        wait_until(lambda: images(gws, "team-c", "wan2.6-t2i") == 1, "the reconciler")
        node = redis_cluster.client()
        wait_until(lambda: node.zscore(f"{CLUSTER_PREFIX}reconcile", lone) is None, "final")
        assert node.hget(f"{CLUSTER_PREFIX}task:{lone}", "status") == "SUCCEEDED"
        time.sleep(0.6)  # another reconciler pass: still counted once
        assert images(gws, "team-c", "wan2.6-t2i") == 1
        # An Idempotency-Key answered through gw1 is replayed by gw2, not run again.
        keyed = {"Idempotency-Key": "cluster-once"}
        first = post(gw1, body(n=2), C, **keyed)
        again = post(gw2, body(n=2), C, **keyed)
        assert first.status_code == 200 and "Idempotency-Replayed" not in first.headers
        assert again.headers.get("Idempotency-Replayed") == "true", again.text
        assert again.content == first.content
        assert images(gws, "team-c", "qwen-image-2.0") == 2
        for gw in gws:
            assert requests.get(gw.url + "/readyz", timeout=5).json()["degraded"] == []
    finally:
        for gw in gws:
            gw.stop()
    for gw in gws:
        assert_no_secret(gw.log_path.read_text())
    keys = recorder.keys()
    kinds = {k.removeprefix(CLUSTER_PREFIX).split(":")[0] for k in keys}
    assert {"task", "tasks", "metered", "reconcile", "rpm", "conc", "used", "idem"} <= kinds, kinds
    assert all(k.startswith(CLUSTER_PREFIX) for k in keys), sorted(keys)
    node = redis_cluster.client()
    slots = {int(node.execute_command("CLUSTER", "KEYSLOT", k)) for k in keys}
    assert slots == {int(node.execute_command("CLUSTER", "KEYSLOT", "dsp"))}


def test_a_cluster_outage_falls_back_and_hands_over(
    sim: Live, redis_cluster: ClusterNode, tmp_path: Path
) -> None:
    gw = GatewayProcess(config(sim, redis_cluster.url, tmp_path / "s.db"), tmp_path, "gw")
    try:
        assert gw.metric("dashscope_proxy_state_backend_up") == 1
        redis_cluster.stop()
        # Submitted and its images used while the cluster is down: kept locally.
        task_id = submit(gw, C)
        assert post(gw, body(n=2), B).status_code == 200
        assert gw.metric("dashscope_proxy_state_backend_up") == 0
        redis_cluster.restart()
        wait_until(lambda: gw.metric("dashscope_proxy_state_backend_up") == 1, "recovery")
        node = redis_cluster.client()
        # Handed over to the cluster (the task, one script per row) with the usage.
        wait_until(lambda: node.exists(f"{CLUSTER_PREFIX}task:{task_id}") == 1, "the handover")
        day = list(node.scan_iter(f"{CLUSTER_PREFIX}used:team-b:d:*"))
        assert len(day) == 1 and node.get(day[0]) == "2", day
        poll_until_succeeded(gw, task_id, C)
        time.sleep(0.6)  # the reconciler as well: counted once
        assert gw.metric("dashscope_proxy_images_total", key="team-c", model="wan2.6-t2i") == 1
        # The quota remembered what was used during the outage: 2 + 4 of 6, then no more.
        assert post_once_free(gw, body(n=4), B).status_code == 200
        r = post_once_free(gw, body(n=1), B)
        assert r.status_code == 429 and r.json()["code"] == "Throttling.AllocationQuota", r.text
    finally:
        gw.stop()


def test_a_single_server_keeps_the_dsp_key_names(
    sim: Live, redis_server: RedisServer, tmp_path: Path
) -> None:
    recorder = KeyRecorder(redis_server.port)
    url = redis_server.url
    gw = GatewayProcess(config(sim, url, tmp_path / "s.db", cluster=False), tmp_path, "gw")
    try:
        task_id = submit(gw, A)
        poll_until_succeeded(gw, task_id, A)
        assert post(gw, body(), B).status_code == 200
    finally:
        gw.stop()
    keys = recorder.keys()
    assert {f"dsp:task:{task_id}", f"dsp:metered:{task_id}", "dsp:tasks:team-a"} <= keys, keys
    assert {"dsp:reconcile", "dsp:rpm:team-a", "dsp:conc:team-b"} <= keys, keys
    assert all(k.startswith("dsp:") and not k.startswith("{") for k in keys), sorted(keys)
    assert redis.Redis(port=redis_server.port).exists(f"dsp:task:{task_id}") == 1


def test_no_key_name_is_made_outside_common() -> None:
    """Every key name comes from `common.Keys`: no other module of the Redis backend spells
    one, and each of its names starts with the prefix (the cluster's hash tag)."""
    for path in REDIS_PACKAGE.glob("*.py"):
        if path.name in ("common.py", "__init__.py"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
            ):
                assert "dsp" not in node.value, (path.name, node.lineno, node.value)
    for lua in REDIS_PACKAGE.glob("*.lua"):
        # Scripts touch only the KEYS they are given: no key name is built in Lua.
        code = "\n".join(
            line for line in lua.read_text().splitlines() if not line.lstrip().startswith("--")
        )
        assert "dsp" not in code and ".." not in code.replace("...", ""), lua.name
        calls = re.findall(r"redis\.call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?", code)
        assert calls, lua.name
        for command, first in calls:
            if command != "TIME":  # every other command the scripts use names a key first
                assert re.fullmatch(r"KEYS\[\d+\]", first.strip()), (lua.name, command, first)
    for prefix in (PREFIX, CLUSTER_PREFIX):
        k = Keys(prefix)
        names = [
            k.reconcile,
            k.pending,
            k.task("t"),
            k.tasks("team"),
            k.metered("t"),
            *k.claim("t"),
            *k.limits("team"),
            k.used("team", "d:20260101"),
        ]
        assert all(n.startswith(prefix) for n in names), names
    assert Keys().task("t") == "dsp:task:t"  # the names existing deployments have


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ("url: redis://h:6379/2\n  cluster: true", "must use database 0"),
        ("url: unix:///tmp/r.sock\n  cluster: true", "redis:// or rediss://"),
        ("url: redis://h\n  cluster: yes-please", "true or false"),
    ],
)
def test_cluster_settings_are_checked(state: str, problem: str) -> None:
    text = f"{UPSTREAM}state:\n  backend: redis\n  {state}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, {})
    assert any(problem in p for p in err.value.problems), err.value.problems
