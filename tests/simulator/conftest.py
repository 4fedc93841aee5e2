"""Fixtures: a real simulator on a free 127.0.0.1 port, served from a background thread.

The dashscope 1.x SDK is synchronous (requests), so the simulator runs its own event loop in
a thread and tests call the SDK directly. `dashscope.base_http_api_url` is set per test with
monkeypatch; every test starts with an empty request log and fault queue.
"""

from __future__ import annotations

from collections.abc import Iterator

import dashscope
import pytest
from sim_helpers import KEY, OTHER_KEY, SimServer, run_simulator

from proxy.simulator import SimSettings

FAST = SimSettings(
    api_keys=frozenset({KEY, OTHER_KEY}),
    pending_seconds=0.4,
    running_seconds=0.2,
    sse_event_delay_seconds=0.01,
)


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimServer]:
    with run_simulator(FAST) as server:
        yield server


@pytest.fixture(scope="session")
def expiring_server() -> Iterator[SimServer]:
    """A simulator whose image URLs expire at once."""
    with run_simulator(SimSettings(pending_seconds=0, running_seconds=0, url_ttl_seconds=0)) as s:
        yield s


@pytest.fixture
def sim(sim_server: SimServer, monkeypatch: pytest.MonkeyPatch) -> SimServer:
    """The shared simulator, with the SDK pointed at it and a clean log and fault queue."""
    monkeypatch.setattr(dashscope, "base_http_api_url", sim_server.base_url)
    monkeypatch.setattr(dashscope, "api_key", KEY)
    sim_server.sim("POST", "/_sim/reset").raise_for_status()
    return sim_server
