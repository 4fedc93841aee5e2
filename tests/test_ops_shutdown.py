"""Graceful shutdown of a real gateway process: SIGTERM during a slow request."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import KEY_A
from tests.ops_support import Launcher, in_background, launching, wait_for
from tests.support import Live


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def in_flight(gw: object) -> None:
    wait_for(
        lambda: (
            gw.metric(
                "dashscope_proxy_inflight_requests",  # type: ignore[attr-defined]
                route="multimodal-generation",
            )
            == 1
        ),
        10,
        "the slow request",
    )


def test_sigterm_drains_a_slow_request_then_exits_0(launcher: Launcher, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    gw = launcher.start(server=f"  usage_log: {ledger}\n")
    t, result = in_background(lambda: gw.generate(KEY_A, "slow [sim:slow=3]", n=2))
    in_flight(gw)

    gw.signal(signal.SIGTERM)
    # Not ready at once: a probe's new connection is refused (the listener is
    # closed) or answered 503 -- never 200 -- while the request is still running.
    wait_for(lambda: gw.ready() != 200, 2, "readiness to fail")
    assert t.is_alive()  # type: ignore[attr-defined]
    with pytest.raises(requests.ConnectionError):
        gw.generate(KEY_A, timeout=5)  # new requests are not accepted

    t.join(15)  # type: ignore[attr-defined]
    slow = result[0]
    assert isinstance(slow, requests.Response) and slow.status_code == 200, slow
    assert len(slow.json()["output"]["choices"]) == 2
    assert gw.wait(15) == 0
    err = gw.stderr_text()
    assert "shutting down" in err and "shutdown complete" in err
    # The drained request was logged and metered, and the ledger flushed.
    lines = gw.access_lines()
    assert [(x["status"], x["images"]) for x in lines] == [(200, 2)]
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert [(e["key"], e["images"]) for e in entries] == [("team-a", 2)]


def test_a_request_longer_than_the_grace_period_is_cut_and_exit_is_still_0(
    launcher: Launcher,
) -> None:
    gw = launcher.start(server="  shutdown_grace_seconds: 1\n")
    t, result = in_background(lambda: gw.generate(KEY_A, "slow [sim:slow=30]"))
    in_flight(gw)
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.wait(15) == 0
    assert time.monotonic() - t0 < 8  # about the grace period, not the 30 s request
    t.join(10)  # type: ignore[attr-defined]
    # The client sees the connection end, not a complete-looking answer.
    assert isinstance(result[0], requests.ConnectionError) or result[0].status_code >= 500


def test_idle_gateway_stops_at_once_on_sigterm_and_sigint(launcher: Launcher) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        gw = launcher.start()
        assert gw.generate(KEY_A).status_code == 200
        t0 = time.monotonic()
        gw.signal(sig)
        assert gw.wait(10) == 0
        assert time.monotonic() - t0 < 5
