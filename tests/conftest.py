"""Shared fixtures: the simulator and the gateway on real sockets, SDK-ready."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dashscope
import pytest
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.config import Config, parse_config, sha256_hex
from proxy.simulator import SimSettings, create_sim_app
from tests.redis_support import redis_server  # noqa: F401 - a fixture for every test file
from tests.support import Live, LoopThread

UPSTREAM_KEY = "sk-sim-upstream"
KEY_A = "gw-team-a-secret-0001"
KEY_B = "gw-team-b-secret-0002"
# Metrics the gateway sets just after a request's answer is written.
AFTER_THE_ANSWER = ("dashscope_proxy_requests_total", "dashscope_proxy_request_duration")


def gateway_yaml(sim_url: str, state_path: Path, extra: str = "") -> str:
    # The usage log is on by default (./dashscope-proxy-usage.jsonl): kept next to the
    # state file so no test writes into the checkout. Before `port` on purpose: tests
    # that add their own `usage_log` after `port: 0` override it (the last key wins).
    return f"""
server:
  host: 127.0.0.1
  usage_log: {state_path.with_name("usage-default.jsonl")}
  port: 0
upstreams:
  - name: sim
    base_url: {sim_url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
  - name: team-b
    key_sha256: "{sha256_hex(KEY_B)}"
    models: ["qwen-image*", "wan2.6-*"]
state:
  path: {state_path}
{extra}
"""


@dataclass
class Gateway:
    live: Live
    config: Config
    registry: CollectorRegistry
    access: io.BytesIO

    @property
    def url(self) -> str:
        return self.live.url

    @property
    def api(self) -> str:
        return self.live.url + "/api/v1"

    def metric(self, name: str, **labels: str) -> float:
        if name.startswith(AFTER_THE_ANSWER):
            self.settled()
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def settled(self, timeout: float = 2.0) -> None:
        """Wait (up to `timeout`) until no request is in flight. The gateway writes a
        request's counter, duration and access line just after its answer, so a client
        thread can have the answer a moment before they exist."""
        deadline = time.monotonic() + timeout
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _in_flight(self) -> float:
        return sum(
            sample.value
            for family in self.registry.collect()
            if family.name == "dashscope_proxy_inflight_requests"
            for sample in family.samples
        )

    def images(self, key: str, model: str) -> float:
        return self.metric("dashscope_proxy_images_total", key=key, model=model)

    def log_lines(self) -> list[dict[str, Any]]:
        import json

        self.settled()
        return [json.loads(line) for line in self.access.getvalue().splitlines() if line]


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def sim_settings() -> SimSettings:
    # PENDING long enough that a cancel issued right after submit lands in it even on
    # a loaded machine, short enough that the SDK's first 1 s poll sees SUCCEEDED.
    return SimSettings(pending_seconds=0.5, running_seconds=0.3)


@pytest.fixture
def sim(loop_thread: LoopThread, sim_settings: SimSettings) -> Iterator[Live]:
    live = loop_thread.serve(create_sim_app(sim_settings))
    yield live
    loop_thread.stop(live)


class GatewayFactory:
    """Starts gateways in front of the simulator; stops them at teardown."""

    def __init__(self, loop_thread: LoopThread, sim: Live, tmp_path: Path) -> None:
        self.loop_thread = loop_thread
        self.sim = sim
        self.state_path = tmp_path / "state.db"
        self.running: list[Gateway] = []

    def __call__(self, extra: str = "", yaml_text: str | None = None, port: int = 0) -> Gateway:
        text = yaml_text or gateway_yaml(self.sim.url, self.state_path, extra)
        config = parse_config(text, {})
        registry = CollectorRegistry()
        access = io.BytesIO()
        app = create_app(config, registry=registry, access_stream=access)
        gw = Gateway(self.loop_thread.serve(app, port=port), config, registry, access)
        self.running.append(gw)
        return gw

    def stop(self, gw: Gateway) -> None:
        self.running.remove(gw)
        self.loop_thread.stop(gw.live)

    def close(self) -> None:
        for gw in list(self.running):
            self.stop(gw)


@pytest.fixture
def start_gateway(loop_thread: LoopThread, sim: Live, tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(loop_thread, sim, tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> Gateway:
    return start_gateway()


@pytest.fixture
def ds(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """The dashscope SDK pointed at the gateway with team-a's key."""
    monkeypatch.setattr(dashscope, "base_http_api_url", gateway.api)
    monkeypatch.setattr(dashscope, "api_key", KEY_A)
    return gateway
