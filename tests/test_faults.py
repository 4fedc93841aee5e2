"""Faults over real sockets: what the client gets, that the gateway keeps serving, that no count
is lost or doubled, and that no connection or task leaks; then failover between two simulators,
the circuit breaker and per-upstream caps."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from proxy.simulator import SimSettings, create_sim_app
from proxy.upstream.health import UPSTREAMS
from proxy.upstream.probe import PROBE_TASK_ID
from tests.conftest import Gateway, GatewayFactory
from tests.resilience_support import (
    IG,
    MM,
    A,
    assert_no_leaks,
    assert_no_secret,
    blackhole,
    body,
    closed_port,
    config_yaml,
    queue_fault,
    sim_model_calls,
    sim_requests,
    upstream_yaml,
)
from tests.support import Live, LoopThread


@pytest.fixture
def sim_settings() -> SimSettings:
    # SSE events 0.3 s apart, so a client can leave mid-stream.
    return SimSettings(pending_seconds=0.1, running_seconds=0.2, sse_event_delay_seconds=0.3)


@pytest.fixture
def sim2(loop_thread: LoopThread, sim_settings: SimSettings) -> Live:
    live = loop_thread.serve(create_sim_app(sim_settings))
    yield live
    loop_thread.stop(live)


def one_upstream(
    start_gateway: GatewayFactory, tmp_path: Path, url: str, extra: str = ""
) -> Gateway:
    return start_gateway(
        yaml_text=config_yaml([upstream_yaml("up", url, extra=extra)], tmp_path / "s.db")
    )


def post(
    gw: Gateway, payload: dict[str, object], path: str = MM, timeout: float = 10, **headers: str
) -> requests.Response:
    return requests.post(gw.url + path, json=payload, headers={**A, **headers}, timeout=timeout)


def still_serving(gw: Gateway) -> None:
    assert requests.get(gw.url + "/healthz", timeout=5).status_code == 200


# ------------------------------------------------------------------ upstream faults


def test_refused_connection(
    start_gateway: GatewayFactory, tmp_path: Path, loop_thread: LoopThread
) -> None:
    gw = one_upstream(
        start_gateway,
        tmp_path,
        f"http://127.0.0.1:{closed_port()}",
        "circuit_breaker: {failures: 1000}",
    )

    def scenario() -> None:
        r = post(gw, body())
        assert r.status_code == 502 and r.json()["code"] == "BadGateway", r.text
        assert "127.0.0.1" not in r.text
        assert_no_secret(r.text)

    assert_no_leaks(loop_thread, scenario, repeat=15)
    assert gw.images("team-a", "qwen-image-2.0") == 0
    assert gw.metric("dashscope_proxy_upstream_errors_total", upstream="up", code="connect") == 16
    still_serving(gw)


def test_connect_timeout_is_504(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    with blackhole() as url:
        gw = one_upstream(start_gateway, tmp_path, url, "timeouts: {connect: 0.3}")
        t0 = time.monotonic()
        r = post(gw, body())
        assert r.status_code == 504 and r.json()["code"] == "GatewayTimeout", r.text
        assert time.monotonic() - t0 < 3
        assert (
            gw.metric(
                "dashscope_proxy_upstream_errors_total", upstream="up", code="connect_timeout"
            )
            == 1
        )
    still_serving(gw)


def test_read_timeout_is_504_and_not_counted(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, loop_thread: LoopThread
) -> None:
    gw = one_upstream(
        start_gateway, tmp_path, sim.url, "timeouts: {read: 0.3}\ncircuit_breaker: {failures: 1000}"
    )

    def scenario() -> None:
        r = post(gw, body("[sim:slow=0.8]"))
        assert r.status_code == 504 and r.json()["code"] == "GatewayTimeout", r.text

    assert_no_leaks(loop_thread, scenario, repeat=6)
    assert gw.images("team-a", "qwen-image-2.0") == 0
    r = post(gw, body())
    assert r.status_code == 200 and gw.images("team-a", "qwen-image-2.0") == 1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("500", 500, "InternalError"),
        ("503", 503, "ServiceUnavailable"),
        ("429", 429, "Throttling.RateQuota"),
        ("quota", 429, "Throttling.AllocationQuota"),
    ],
)
def test_error_statuses_relayed_unchanged(
    start_gateway: GatewayFactory,
    sim: Live,
    tmp_path: Path,
    loop_thread: LoopThread,
    fault: str,
    status: int,
    code: str,
) -> None:
    gw = one_upstream(start_gateway, tmp_path, sim.url, "circuit_breaker: {failures: 1000}")

    def scenario() -> None:
        r = post(gw, body(f"[sim:error={fault}]"))
        assert r.status_code == status and r.json()["code"] == code, r.text

    assert_no_leaks(loop_thread, scenario, repeat=8)
    assert gw.images("team-a", "qwen-image-2.0") == 0
    # The only upstream: DashScope's own answer is what the client must see.
    assert (
        gw.metric(
            "dashscope_proxy_upstream_failovers_total", from_upstream="up", reason="unavailable"
        )
        == 0
    )
    assert post(gw, body()).status_code == 200
    assert gw.images("team-a", "qwen-image-2.0") == 1


def test_upstream_closing_mid_body(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, loop_thread: LoopThread
) -> None:
    gw = one_upstream(start_gateway, tmp_path, sim.url, "circuit_breaker: {failures: 1000}")

    def scenario() -> None:
        try:
            r = post(gw, body("[sim:truncate]"))
        except requests.RequestException:
            return  # connection closed mid-body: a truncation, as it should look
        # Whatever arrived must not parse as a complete answer.
        assert r.status_code >= 500 or not _is_json(r.content), r.content[:200]

    assert_no_leaks(loop_thread, scenario, repeat=8)
    assert gw.images("team-a", "qwen-image-2.0") == 0
    assert post(gw, body()).status_code == 200


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def test_upstream_invalid_json_relayed_and_not_counted(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, loop_thread: LoopThread
) -> None:
    gw = one_upstream(start_gateway, tmp_path, sim.url)

    def scenario() -> None:
        r = post(gw, body("[sim:badjson]"))
        # The gateway relays DashScope's bytes; it does not invent a body.
        assert r.status_code == 200 and not _is_json(r.content)

    assert_no_leaks(loop_thread, scenario, repeat=8)
    assert gw.images("team-a", "qwen-image-2.0") == 0


def _interleave(text: str = "a tutorial") -> dict[str, object]:
    return {
        "model": "wan2.6-image",
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
        "parameters": {"enable_interleave": True, "max_images": 3, "size": "1280*1280"},
    }


SSE = {"X-DashScope-SSE": "enable", "Accept": "text/event-stream"}


def test_very_slow_stream_is_relayed_event_by_event(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = one_upstream(start_gateway, tmp_path, sim.url, "timeouts: {read: 2}")
    t0 = time.monotonic()
    with requests.post(
        gw.url + MM, json=_interleave(), headers={**A, **SSE}, stream=True, timeout=10
    ) as r:
        assert r.status_code == 200
        arrivals = []
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 3, arrivals
    # The first event reached the client long before the last one was produced.
    assert arrivals[0] < arrivals[-1] - 0.4, arrivals
    assert gw.images("team-a", "wan2.6-image") == 3


def test_stream_slower_than_read_timeout_is_cut(
    start_gateway: GatewayFactory, tmp_path: Path, loop_thread: LoopThread
) -> None:
    slow = loop_thread.serve(create_sim_app(SimSettings(sse_event_delay_seconds=1.0)))
    try:
        gw = one_upstream(start_gateway, tmp_path, slow.url, "timeouts: {read: 0.4}")
        events = 0
        try:
            with requests.post(
                gw.url + MM, json=_interleave(), headers={**A, **SSE}, stream=True, timeout=10
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    events += line.startswith(b"data:")
        except requests.RequestException:
            pass  # the connection is closed: the client sees a truncated stream
        assert events >= 1
        assert gw.images("team-a", "wan2.6-image") == 0
        assert (
            gw.metric("dashscope_proxy_upstream_errors_total", upstream="up", code="timeout") == 1
        )
        still_serving(gw)
    finally:
        loop_thread.stop(slow)


# ------------------------------------------------------------------ client faults


def test_client_disconnect_mid_request(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, loop_thread: LoopThread
) -> None:
    gw = one_upstream(start_gateway, tmp_path, sim.url)
    payload = json.dumps(body()).encode()

    def scenario() -> None:
        with socket.create_connection(("127.0.0.1", gw.live.port), timeout=5) as s:
            s.sendall(
                (
                    f"POST {MM} HTTP/1.1\r\nHost: x\r\nAuthorization: {A['Authorization']}"
                    f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
                    "\r\n\r\n"
                ).encode()
                + payload[: len(payload) // 2]
            )
            time.sleep(0.05)

    before = sim_model_calls(sim)
    assert_no_leaks(loop_thread, scenario, repeat=15)
    assert sim_model_calls(sim) == before  # a half-sent request never reaches DashScope
    deadline = time.monotonic() + 5
    while (
        gw.metric("dashscope_proxy_inflight_requests", route="multimodal-generation")
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert gw.metric("dashscope_proxy_inflight_requests", route="multimodal-generation") == 0
    assert post(gw, body()).status_code == 200


def test_client_disconnect_mid_stream_still_counted(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, loop_thread: LoopThread
) -> None:
    gw = one_upstream(start_gateway, tmp_path, sim.url)
    runs = [0]

    def scenario() -> None:
        with requests.post(
            gw.url + MM, json=_interleave(), headers={**A, **SSE}, stream=True, timeout=10
        ) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith(b"data:"))
        runs[0] += 1  # leaving the block closes the connection after the first event
        # The gateway keeps draining: DashScope generated (and bills) every image.
        deadline = time.monotonic() + 10
        while gw.images("team-a", "wan2.6-image") < 3 * runs[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.images("team-a", "wan2.6-image") == 3 * runs[0]

    assert_no_leaks(loop_thread, scenario, repeat=5)
    time.sleep(0.5)
    assert gw.images("team-a", "wan2.6-image") == 3 * runs[0]  # once each, never twice


# ------------------------------------------------------------------------ failover


def two(
    start_gateway: GatewayFactory,
    tmp_path: Path,
    url_a: str,
    url_b: str,
    extra_a: str = "",
    extra_b: str = "",
    key_a_extra: str = "",
) -> Gateway:
    return start_gateway(
        yaml_text=config_yaml(
            [
                upstream_yaml("a", url_a, priority=0, extra=extra_a),
                upstream_yaml("b", url_b, priority=1, extra=extra_b),
            ],
            tmp_path / "s.db",
            key_a_extra=key_a_extra,
        )
    )


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("error=503", "unavailable"), ("error=429", "throttled"), ("error=quota", "throttled")],
)
def test_failover_on_503_and_throttling(
    start_gateway: GatewayFactory, sim: Live, sim2: Live, tmp_path: Path, fault: str, reason: str
) -> None:
    gw = two(start_gateway, tmp_path, sim.url, sim2.url)
    queue_fault(sim, fault)
    r = post(gw, body())
    assert r.status_code == 200, r.text
    assert sim_model_calls(sim) == 1 and sim_model_calls(sim2) == 1
    assert gw.images("team-a", "qwen-image-2.0") == 1  # once, by the upstream that served
    assert (
        gw.metric("dashscope_proxy_upstream_failovers_total", from_upstream="a", reason=reason) == 1
    )
    assert gw.log_lines()[-1]["upstream"] == "b"
    r = post(gw, body())  # the fault is used up: back on the preferred upstream
    assert r.status_code == 200 and sim_model_calls(sim) == 2


def test_failover_when_first_is_down(
    start_gateway: GatewayFactory, sim2: Live, tmp_path: Path
) -> None:
    gw = two(start_gateway, tmp_path, f"http://127.0.0.1:{closed_port()}", sim2.url)
    assert post(gw, body()).status_code == 200
    assert (
        gw.metric("dashscope_proxy_upstream_failovers_total", from_upstream="a", reason="connect")
        == 1
    )
    with blackhole() as url:
        gw = two(start_gateway, tmp_path, url, sim2.url, extra_a="timeouts: {connect: 0.3}")
        assert post(gw, body()).status_code == 200
        assert (
            gw.metric(
                "dashscope_proxy_upstream_failovers_total",
                from_upstream="a",
                reason="connect_timeout",
            )
            == 1
        )
    assert gw.images("team-a", "qwen-image-2.0") == 1


def test_no_failover_once_dashscope_may_have_run_it(
    start_gateway: GatewayFactory, sim: Live, sim2: Live, tmp_path: Path
) -> None:
    gw = two(start_gateway, tmp_path, sim.url, sim2.url, extra_a="timeouts: {read: 0.3}")
    r = post(gw, body("[sim:slow=1]"))  # sent, then silence: may be generating
    assert r.status_code == 504
    queue_fault(sim, "error=500")
    r = post(gw, body())
    assert r.status_code == 500 and r.json()["code"] == "InternalError"
    queue_fault(sim, "truncate")
    with contextlib.suppress(requests.RequestException):
        post(gw, body())
    assert sim_model_calls(sim2) == 0  # never sent twice
    assert gw.images("team-a", "qwen-image-2.0") == 0


def test_breaker_opens_and_probes_back(
    start_gateway: GatewayFactory, sim: Live, sim2: Live, tmp_path: Path
) -> None:
    gw = two(
        start_gateway,
        tmp_path,
        sim.url,
        sim2.url,
        extra_a="circuit_breaker: {failures: 2, cooldown_seconds: 0.5}",
    )
    assert gw.metric("dashscope_proxy_upstream_up", upstream="a") == 1
    queue_fault(sim, "error=503", count=2)
    for _ in range(2):
        assert post(gw, body()).status_code == 200
    assert gw.metric("dashscope_proxy_upstream_up", upstream="a") == 0
    ready = requests.get(gw.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and "upstream a: circuit open" in ready.json()["degraded"]
    calls_a = sim_model_calls(sim)
    assert post(gw, body()).status_code == 200  # open: a is skipped without a call
    assert sim_model_calls(sim) == calls_a
    assert (
        gw.metric(
            "dashscope_proxy_upstream_failovers_total", from_upstream="a", reason="circuit_open"
        )
        == 1
    )
    time.sleep(0.6)
    assert post(gw, body()).status_code == 200  # half-open: this request is the probe
    assert sim_model_calls(sim) == calls_a + 1
    assert gw.metric("dashscope_proxy_upstream_up", upstream="a") == 1
    assert gw.images("team-a", "qwen-image-2.0") == 4
    assert requests.get(gw.url + "/readyz", timeout=5).json()["status"] == "ready"


def test_all_circuits_open_is_503_with_retry_after(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = one_upstream(
        start_gateway,
        tmp_path,
        f"http://127.0.0.1:{closed_port()}",
        "circuit_breaker: {failures: 1, cooldown_seconds: 30}",
    )
    assert post(gw, body()).status_code == 502
    r = post(gw, body())
    assert r.status_code == 503 and r.json()["code"] == "ServiceUnavailable"
    assert 25 <= int(r.headers["Retry-After"]) <= 30
    r = requests.post(gw.url + "/v1/images/generations", json={"prompt": "x"}, headers=A, timeout=5)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_task_polls_stay_on_the_creating_upstream(
    start_gateway: GatewayFactory, sim: Live, sim2: Live, tmp_path: Path
) -> None:
    gw = two(start_gateway, tmp_path, sim.url, sim2.url)
    r = post(gw, body(model="wan2.6-t2i", n=1), path=IG, **{"X-DashScope-Async": "enable"})
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    queue_fault(sim, "error=503", count=1, polls=True)
    r = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=A, timeout=5)
    assert r.status_code == 503  # relayed from a (the SDK retries it), never asked of b
    assert not any(
        "/tasks/" in str(x.get("path")) and PROBE_TASK_ID not in str(x.get("path"))
        for x in sim_requests(sim2)
    )  # (the gateway's key probe asks every upstream for an id no task has)
    deadline = time.monotonic() + 10
    while True:
        r = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=A, timeout=5)
        if r.json()["output"]["task_status"] == "SUCCEEDED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.json()["output"]["task_status"] == "SUCCEEDED"
    assert gw.images("team-a", "wan2.6-t2i") == 1


def test_max_concurrency_spills_to_the_next_upstream(
    start_gateway: GatewayFactory, sim: Live, sim2: Live, tmp_path: Path
) -> None:
    gw = two(start_gateway, tmp_path, sim.url, sim2.url, extra_a="max_concurrency: 1")
    results: list[int] = []

    def one() -> None:
        results.append(post(gw, body("[sim:slow=0.5]")).status_code)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert sim_model_calls(sim) == 1 and sim_model_calls(sim2) == 1
    assert (
        gw.metric("dashscope_proxy_upstream_failovers_total", from_upstream="a", reason="busy") == 1
    )
    assert gw.live.app[UPSTREAMS].gate("a").inflight == 0


def test_weights_spread_equal_priorities(
    start_gateway: GatewayFactory, sim: Live, sim2: Live, tmp_path: Path
) -> None:
    gw = start_gateway(
        yaml_text=config_yaml(
            [upstream_yaml("a", sim.url, extra="weight: 3"), upstream_yaml("b", sim2.url)],
            tmp_path / "s.db",
        )
    )
    gw.live.app[UPSTREAMS].rng.seed(7)
    for _ in range(40):
        assert post(gw, body()).status_code == 200
    a, b = sim_model_calls(sim), sim_model_calls(sim2)
    assert a + b == 40 and a > b > 0, (a, b)
