"""Managed Redis as operators run it: TLS (`rediss://`, a private CA) and a password from the
environment (a Kubernetes Secret), against a real redis-server behind a real TLS front."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.redis_support import REDIS_SERVER
from tests.resilience_support import IG, A, GatewayProcess, body, closed_port, team_a_yaml
from tests.support import Live
from tests.tls_support import tls_front

PASSWORD = "pw-" + "x7Q#t9!v/z"  # URL-hostile characters: why `state.password` exists


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    port = closed_port()
    proc = subprocess.Popen(
        [
            str(REDIS_SERVER),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def config(sim: Live, tmp_path: Path, tls_port: int, ca: Path, password_var: str) -> str:
    return team_a_yaml(
        sim.url,
        usage_log=tmp_path / "usage.jsonl",
        state=(
            f"  backend: redis\n  url: rediss://127.0.0.1:{tls_port}/0\n"
            f"  password: ${{{password_var}}}\n  tls_ca_file: {ca}\n"
            f"  path: {tmp_path / 'spool.db'}"
        ),
    )


def test_tls_and_a_password_from_the_environment(
    sim: Live,
    tmp_path: Path,
    redis_with_password: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("TEST_WRONG_PASSWORD", "not-it")
    direct = redis.Redis(port=redis_with_password, password=PASSWORD)
    with tls_front(redis_with_password, tmp_path) as (tls_port, ca):
        gw = GatewayProcess(
            config(sim, tmp_path, tls_port, ca, "TEST_REDIS_PASSWORD"), tmp_path, "gw"
        )
        try:
            assert gw.metric("dashscope_proxy_state_backend_up") == 1
            r = requests.post(
                gw.url + IG,
                json=body(model="wan2.6-t2i", n=1),
                headers={**A, "X-DashScope-Async": "enable"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            task_id = r.json()["output"]["task_id"]
            # It went through TLS into that Redis, authenticated.
            assert direct.exists(f"dsp:task:{task_id}") == 1
            ready = requests.get(gw.url + "/readyz", timeout=5).json()
            assert ready["degraded"] == [], ready
            assert PASSWORD not in gw.log_path.read_text()
        finally:
            gw.stop()
        bad = GatewayProcess(
            config(sim, tmp_path, tls_port, ca, "TEST_WRONG_PASSWORD"), tmp_path, "bad"
        )
        try:
            # Still serving, from the local fallback, and saying why.
            assert bad.metric("dashscope_proxy_state_backend_up") == 0
            ready = requests.get(bad.url + "/readyz", timeout=5).json()
            assert any("redis" in d for d in ready["degraded"]), ready
            assert "not-it" not in bad.log_path.read_text()
        finally:
            bad.stop()
