"""Counts through a SIGTERM drain, with real gateway processes and real signals.

The images of every request in flight at SIGTERM reach a scrape of /metrics before the
process exits (the metrics listener outlives the API listener, then waits for a final
scrape); the whole drain is bounded by `server.shutdown_grace_seconds`; a request cut at
its end is counted as unmetered; the drain line says how many requests were in flight,
and a busy port says which option changes it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, parse_config
from tests.conftest import KEY_A, gateway_yaml
from tests.ops_support import REPO, GatewayProcess, Launcher, in_background, launching, wait_for
from tests.resilience_support import closed_port
from tests.support import Live

IMAGES = "dashscope_proxy_images_total"
UNMETERED = "dashscope_proxy_unmetered_answers_total"
INFLIGHT = "dashscope_proxy_inflight_requests"


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def images_in(sample: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _), v in sample.items() if name == IMAGES)


def in_flight(gw: GatewayProcess, count: int) -> None:
    wait_for(
        lambda: gw.metric(INFLIGHT, route="multimodal-generation") == count,
        10,
        f"{count} request(s) in flight",
    )


def test_images_metered_during_the_drain_reach_a_scrape_before_exit(
    launcher: Launcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.jsonl"
    mport = closed_port()
    gw = launcher.start(
        server=f"  usage_log: {ledger}\n  metrics_port: {mport}\n  final_scrape_seconds: 20\n"
    )
    held = [in_background(partial(gw.generate, KEY_A, "held [sim:slow=2]", n=n)) for n in (1, 2, 3)]
    in_flight(gw, 3)
    assert images_in(scrape(mport)) == 0  # nothing counted yet: all of it is in flight

    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    wait_for(lambda: gw.ready() is None, 2, "the API listener to close")
    with pytest.raises(requests.ConnectionError):
        gw.generate(KEY_A, timeout=5)  # new API requests are refused, as before
    # The metrics listener serves through the drain, and says it is draining.
    ready = requests.get(f"http://127.0.0.1:{mport}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["problems"] == ["draining"]
    assert requests.get(f"http://127.0.0.1:{mport}/healthz", timeout=5).status_code == 200
    assert scrape(mport)[(INFLIGHT, (("route", "multimodal-generation"),))] == 3

    for t, result in held:
        t.join(15)
        assert isinstance(result[0], requests.Response) and result[0].status_code == 200
    # Every in-flight request settled: a scrape shows all their images while the
    # process is still up, and then it exits at once rather than at the window's end.
    assert images_in(scrape(mport)) == 6
    scraped = time.monotonic()
    assert gw.wait(10) == 0
    assert time.monotonic() - scraped < 5 and time.monotonic() - t0 < 15
    assert [json.loads(x)["images"] for x in ledger.read_text().splitlines()].count(None) == 0
    err = gw.stderr_text()
    assert "3 request(s) in flight" in err and "final scrape served" in err


def test_the_whole_drain_is_bounded_by_the_grace(launcher: Launcher, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    gw = launcher.start(server=f"  usage_log: {ledger}\n  shutdown_grace_seconds: 2\n")
    t, result = in_background(lambda: gw.generate(KEY_A, "held [sim:slow=30]"))
    in_flight(gw, 1)
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.wait(15) == 0
    took = time.monotonic() - t0
    assert took < 2 + 1.5, f"the drain took {took:.2f}s with a grace of 2s"
    t.join(10)
    assert isinstance(result[0], requests.ConnectionError)  # cut: never a "complete" answer
    # What was cut is on record: DashScope may still generate and bill it.
    (line,) = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert (line["images"], line["reason"], line["key"], line["route"]) == (
        None,
        "drain_cut",
        "team-a",
        "multimodal-generation",
    )
    (access,) = gw.access_lines()
    assert access["status"] == 499 and access["request_id"] == line["request_id"]
    err = gw.stderr_text()
    assert "1 request(s) in flight get up to 2s" in err and "cut 1 request(s)" in err


def test_a_request_cut_at_the_end_of_the_drain_reaches_the_final_scrape(
    launcher: Launcher,
) -> None:
    mport = closed_port()
    gw = launcher.start(
        server=f"  shutdown_grace_seconds: 1\n  metrics_port: {mport}\n  final_scrape_seconds: 20\n"
    )
    t, _ = in_background(lambda: gw.generate(KEY_A, "held [sim:slow=30]"))
    in_flight(gw, 1)
    gw.signal(signal.SIGTERM)
    wait_for(
        lambda: scrape(mport)[(UNMETERED, (("reason", "drain_cut"),))] == 1,
        5,
        "the cut request in a scrape",
    )
    assert gw.wait(10) == 0
    t.join(10)


def test_a_busy_port_names_the_option_that_changes_it(launcher: Launcher) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launcher.config_path.write_text(launcher.yaml())
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "--config", str(launcher.config_path)]
            + ["--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert done.returncode == 1
        assert "address already in use (change it with --port / server.port)" in done.stderr

        launcher.config_path.write_text(launcher.yaml(server=f"  metrics_port: {port}\n"))
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "--config", str(launcher.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert done.returncode == 1
        assert "address already in use (change it with server.metrics_port)" in done.stderr
        assert "Traceback" not in done.stderr


def test_workers_share_the_metrics_port_and_drain_with_it(launcher: Launcher) -> None:
    mport = closed_port()
    gw = launcher.start(
        "",
        server=f"  workers: 2\n  metrics_port: {mport}\n  final_scrape_seconds: 20\n",
        workers=True,
    )
    wait_for(lambda: gw.stderr_text().count("metrics listener") == 2, 15, "both workers")
    for n in (1, 2, 3):
        assert gw.generate(KEY_A, n=n).status_code == 200
    # Whichever worker answers on the metrics port, it shows the sum over both.
    assert all(images_in(scrape(mport)) == 6 for _ in range(4))
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    # A worker whose counts a scrape has not seen since waits for one; scrape until gone.
    while gw.proc.poll() is None and time.monotonic() - t0 < 15:
        with contextlib.suppress(requests.ConnectionError):
            scrape(mport)
        time.sleep(0.2)
    assert gw.wait(10) == 0
    assert time.monotonic() - t0 < 15


def test_metrics_port_and_final_scrape_config() -> None:
    base = gateway_yaml("http://127.0.0.1:1", Path("s.db"))
    config = parse_config(base, {})
    assert (config.server.metrics_port, config.server.final_scrape_seconds) == (None, 5.0)
    config = parse_config(base.replace("  port: 0\n", "  port: 8080\n  metrics_port: 9090\n"), {})
    assert config.server.metrics_port == 9090
    with pytest.raises(ConfigError) as same:
        parse_config(base.replace("  port: 0\n", "  port: 8080\n  metrics_port: 8080\n"), {})
    assert same.value.problems == ["server.metrics_port: must differ from port (8080)"]
    with pytest.raises(ConfigError) as random_port:
        parse_config(
            base.replace("  port: 0\n", "  port: 0\n  workers: 2\n  metrics_port: 0\n"), {}
        )
    assert random_port.value.problems == [
        "server.metrics_port: must be a fixed port (not 0) with workers > 1"
    ]
    with pytest.raises(ConfigError):
        parse_config(base.replace("  port: 0\n", "  port: 0\n  final_scrape_seconds: -1\n"), {})
