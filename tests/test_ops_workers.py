"""`server.workers: 2`: two processes on one port, a supervisor, metrics that add up."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from proxy.config import parse_config
from proxy.ops.supervisor import Supervisor
from tests.conftest import KEY_A, gateway_yaml
from tests.ops_support import (
    GatewayProcess,
    Launcher,
    in_background,
    launching,
    wait_for,
    write_atomically,
)
from tests.support import Live

KEY_C = "gw-team-c-secret-0003"
REQUESTS = "dashscope_proxy_requests_total"
IMAGES = "dashscope_proxy_images_total"
INFLIGHT = "dashscope_proxy_inflight_requests"


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def listening(gw: GatewayProcess) -> int:
    return len(
        re.findall(r"worker-\d proxy\.ops\.server: dashscope-proxy listening on", gw.stderr_text())
    )


def worker_pids(gw: GatewayProcess) -> dict[int, int]:
    """worker index -> pid of its latest start, from the supervisor's log."""
    return {
        int(i): int(p)
        for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", gw.stderr_text())
    }


def test_two_workers_share_the_port_and_metrics_add_up(launcher: Launcher, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    gw = launcher.start(server=f"  workers: 2\n  usage_log: {ledger}\n", workers=True)
    wait_for(lambda: listening(gw) == 2, 15, "both workers")
    pids = worker_pids(gw)
    assert len(pids) == 2 and gw.proc.pid not in pids.values()

    sent = 40
    for i in range(sent):
        r = gw.generate(KEY_A, n=1 + i % 2)
        assert r.status_code == 200, (r.text, gw.stderr_text()[-3000:])
    images = sum(1 + i % 2 for i in range(sent))
    served_by = {line["pid"] for line in gw.access_lines()}
    assert served_by == set(pids.values())  # the kernel spread the connections

    # Whichever worker answers the scrape, the totals are the sums over both.
    for _ in range(4):
        assert gw.metric_sum(REQUESTS) == sent
        assert gw.metric_sum(IMAGES) == images
        assert gw.metric(INFLIGHT, route="multimodal-generation") == 0
        assert gw.metric("dashscope_proxy_config_last_reload_successful") == 1
    assert len(ledger.read_text().splitlines()) == sent  # both workers appended whole lines

    # A worker dies: the supervisor restarts it; its counts are not lost.
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: listening(gw) == 3, 15, "the restarted worker")
    assert "worker 0 (pid" in gw.stderr_text() and "restarting" in gw.stderr_text()
    assert gw.metric_sum(REQUESTS) == sent
    assert gw.metric_sum(IMAGES) == images
    for _ in range(10):
        assert gw.generate(KEY_A).status_code == 200
    assert gw.metric_sum(REQUESTS) == sent + 10
    assert gw.metric(INFLIGHT, route="multimodal-generation") == 0

    gw.signal(signal.SIGTERM)
    assert gw.wait(20) == 0


def test_supervisor_forwards_sighup_and_sigterm(launcher: Launcher) -> None:
    gw = launcher.start("", "--config-poll-seconds", "0", server="  workers: 2\n", workers=True)
    wait_for(lambda: listening(gw) == 2, 15, "both workers")
    found = re.search(r"\(metrics directory (\S+)\)", gw.stderr_text())
    assert found
    metrics_dir = Path(found.group(1))
    assert any(metrics_dir.glob("counter_*.db"))

    text = launcher.yaml(server="  workers: 2\n").replace(
        "state:\n", f"  - name: team-c\n    key: {KEY_C}\nstate:\n", 1
    )
    write_atomically(launcher.config_path, text)
    assert gw.generate(KEY_C).status_code == 401
    gw.signal(signal.SIGHUP)
    wait_for(
        lambda: gw.metric("dashscope_proxy_config_reloads_total", result="success") == 2,
        10,
        "both workers to reload",
    )
    assert all(gw.generate(KEY_C).status_code == 200 for _ in range(20))

    t, result = in_background(lambda: gw.generate(KEY_A, "slow [sim:slow=2]"))
    wait_for(lambda: gw.metric(INFLIGHT, route="multimodal-generation") == 1, 10, "in flight")
    gw.signal(signal.SIGTERM)
    t.join(15)
    assert isinstance(result[0], requests.Response) and result[0].status_code == 200
    assert gw.wait(20) == 0
    assert "all workers stopped, exit code 0" in gw.stderr_text()
    assert not metrics_dir.exists()  # the per-run directory is removed


def test_supervisor_gives_up_on_a_crash_loop_and_on_a_busy_port(tmp_path: Path) -> None:
    config = parse_config(
        gateway_yaml("http://127.0.0.1:1", tmp_path / "s.db").replace(
            "  port: 0\n", "  port: 0\n  workers: 2\n"
        ),
        {},
    )
    # Workers that die at once (here: a "python" that exits 1) are restarted with
    # backoff, then the supervisor stops and reports failure to its orchestrator.
    sup = Supervisor(
        config,
        "unused.yaml",
        host="127.0.0.1",
        port=0,
        environ={},
        python="/bin/false",
        restart_backoff=0.01,
    )
    t0 = time.monotonic()
    assert sup.run() == 1
    assert time.monotonic() - t0 < 10

    with socket.socket() as busy:  # an ordinary listener, no SO_REUSEPORT
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        sup = Supervisor(
            config, "unused.yaml", host="127.0.0.1", port=busy.getsockname()[1], environ={}
        )
        assert sup.run() == 1  # at once: no worker is started
