"""Bad input and upstream failure on /api/v1: clear DashScope-shaped errors, counts intact,
the gateway keeps serving. Raw HTTP over real sockets."""

from __future__ import annotations

import socket
import time

import requests

from tests.conftest import KEY_A, UPSTREAM_KEY, Gateway, GatewayFactory, gateway_yaml
from tests.support import Live

MM = "/api/v1/services/aigc/multimodal-generation/generation"
AUTH = {"Authorization": f"Bearer {KEY_A}"}


def body(text: str = "a cat", model: str = "qwen-image-2.0") -> dict[str, object]:
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
        "parameters": {"size": "1024*1024"},
    }


def sim_count(sim: Live) -> int:
    return len(requests.get(sim.url + "/_sim/requests", timeout=5).json()["requests"])


def assert_ds_error(r: requests.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    j = r.json()
    assert j["code"] == code and j["message"] and j["request_id"], j
    return j


def still_serving(gw: Gateway) -> None:
    r = requests.post(gw.url + MM, json=body(), headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text


def test_bad_bodies(gateway: Gateway, sim: Live) -> None:
    u = gateway.url + MM
    before = sim_count(sim)
    assert_ds_error(
        requests.post(u, data=b"{not json", headers=AUTH, timeout=5), 400, "InvalidParameter"
    )
    assert_ds_error(
        requests.post(u, data=b"[1,2]", headers=AUTH, timeout=5), 400, "InvalidParameter"
    )
    assert_ds_error(
        requests.post(u, data=b"", headers=AUTH, timeout=5), 400, "BadRequest.EmptyInput"
    )
    assert_ds_error(
        requests.post(u, json={"input": {}}, headers=AUTH, timeout=5), 400, "BadRequest.EmptyModel"
    )
    assert_ds_error(
        requests.post(u, json={"model": 5}, headers=AUTH, timeout=5), 400, "InvalidParameter"
    )
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_ds_error(
        requests.post(u, data=b'{"model":"x","a":' + deep + b"}", headers=AUTH, timeout=10),
        400,
        "InvalidParameter",
    )
    assert_ds_error(requests.post(u, json=body(), timeout=5), 401, "NoApiKey")
    assert_ds_error(
        requests.post(u, json=body(), headers={"Authorization": "Basic abc"}, timeout=5),
        401,
        "InvalidApiKey",
    )
    assert sim_count(sim) == before  # nothing reached DashScope
    assert gateway.images("team-a", "qwen-image-2.0") == 0
    still_serving(gateway)


def test_body_limit_413_before_reading(start_gateway: GatewayFactory, sim: Live, tmp_path) -> None:
    gw = start_gateway(
        yaml_text=gateway_yaml(sim.url, tmp_path / "s.db").replace(
            "  port: 0", "  port: 0\n  max_body_bytes: 4096"
        )
    )
    big = body("x" * 10_000)
    assert_ds_error(
        requests.post(gw.url + MM, json=big, headers=AUTH, timeout=5), 413, "BadRequest.TooLarge"
    )

    # Announce a huge body and send none of it: answered at once, not after a read.
    with socket.create_connection(("127.0.0.1", gw.live.port), timeout=5) as s:
        s.sendall(
            (
                f"POST {MM} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
            ).encode()
        )
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head

    def chunks():  # chunked upload with no length: cut off while streaming
        for _ in range(10):
            yield b"x" * 1000

    assert_ds_error(
        requests.post(gw.url + MM, data=chunks(), headers=AUTH, timeout=5),
        413,
        "BadRequest.TooLarge",
    )
    still_serving(gw)


def test_unknown_paths_and_methods(gateway: Gateway, sim: Live) -> None:
    r = requests.get(gateway.url + "/api/v1/nothing/here", timeout=5)
    assert_ds_error(r, 404, "NotFound")
    r = requests.get(gateway.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(gateway.url + MM, headers=AUTH, timeout=5)
    assert_ds_error(r, 405, "MethodNotAllowed")
    before = sim_count(sim)
    for tricky in ("..%2F..%2Fservices", "a%20b", "%2e%2e", "x" * 300, "a;b"):
        r = requests.get(gateway.url + "/api/v1/tasks/" + tricky, headers=AUTH, timeout=5)
        assert r.status_code in (400, 404), (tricky, r.status_code)
        assert r.json().get("code") in ("InvalidParameter", "NotFound")
    assert sim_count(sim) == before
    m = requests.get(gateway.url + "/metrics", timeout=5).text
    assert "nothing" not in m and "%2F" not in m  # no raw paths in labels
    still_serving(gateway)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_upstream_refused_is_502(start_gateway: GatewayFactory, sim: Live, tmp_path) -> None:
    text = gateway_yaml(f"http://127.0.0.1:{_closed_port()}", tmp_path / "s.db")
    gw = start_gateway(yaml_text=text)
    r = requests.post(gw.url + MM, json=body(), headers=AUTH, timeout=10)
    j = assert_ds_error(r, 502, "BadGateway")
    assert "127.0.0.1" not in str(j)  # no upstream address in the answer
    assert gw.metric("dashscope_proxy_upstream_errors_total", upstream="sim", code="connect") == 1


def test_upstream_timeout_is_504_and_truncation_closes(
    start_gateway: GatewayFactory, sim: Live, tmp_path
) -> None:
    text = gateway_yaml(sim.url, tmp_path / "s.db").replace(
        "    api_key:", "    timeouts: {read: 0.5}\n    api_key:"
    )
    gw = start_gateway(yaml_text=text)
    t0 = time.monotonic()
    r = requests.post(gw.url + MM, json=body("[sim:slow=3]"), headers=AUTH, timeout=10)
    assert_ds_error(r, 504, "GatewayTimeout")
    assert time.monotonic() - t0 < 2.5
    assert gw.metric("dashscope_proxy_upstream_errors_total", upstream="sim", code="timeout") == 1
    try:
        r = requests.post(gw.url + MM, json=body("[sim:truncate]"), headers=AUTH, timeout=10)
        # A body that arrives must not parse as a complete, valid answer.
        truncated = r.status_code >= 500
        if r.status_code == 200:
            try:
                r.json()
            except ValueError:
                truncated = True
        assert truncated, r.text
    except requests.exceptions.RequestException:
        pass  # connection closed mid-body: what a truncation should look like
    assert gw.images("team-a", "qwen-image-2.0") == 0
    still_serving(gw)


def test_upstream_errors_pass_through_uncounted(gateway: Gateway) -> None:
    r = requests.post(gateway.url + MM, json=body("[sim:error=429]"), headers=AUTH, timeout=5)
    assert r.status_code == 429 and r.json()["code"].startswith("Throttling")
    r = requests.post(
        gateway.url + MM, json=body("[sim:error=inspection]"), headers=AUTH, timeout=5
    )
    assert r.status_code == 400 and r.json()["code"] == "DataInspectionFailed"
    r = requests.post(gateway.url + MM, json=body("[sim:error=500]"), headers=AUTH, timeout=5)
    assert r.status_code == 500 and r.json()["code"] == "InternalError"
    assert gateway.images("team-a", "qwen-image-2.0") == 0
    code = r.json()["code"]
    assert gateway.metric("dashscope_proxy_upstream_errors_total", upstream="sim", code=code) == 1
    assert (
        gateway.metric(
            "dashscope_proxy_requests_total",
            route="multimodal-generation",
            key="team-a",
            model="qwen-image-2.0",
            code="429",
        )
        == 1
    )
    still_serving(gateway)


def test_client_disconnect_after_submit_still_counted(gateway: Gateway) -> None:
    # Send a slow request, then vanish before DashScope answers.
    payload = requests.models.complexjson.dumps(body("[sim:slow=1]")).encode()
    with socket.create_connection(("127.0.0.1", gateway.live.port), timeout=5) as s:
        s.sendall(
            (
                f"POST {MM} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode()
            + payload
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 10

    def settled() -> bool:
        return (
            gateway.images("team-a", "qwen-image-2.0") >= 1
            and gateway.metric("dashscope_proxy_inflight_requests", route="multimodal-generation")
            == 0
        )

    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.images("team-a", "qwen-image-2.0") == 1
    assert gateway.metric("dashscope_proxy_inflight_requests", route="multimodal-generation") == 0
    still_serving(gateway)
    assert UPSTREAM_KEY not in gateway.access.getvalue().decode()


def test_state_store_failure_still_answers_and_counts(
    start_gateway: GatewayFactory, tmp_path
) -> None:
    """A locked state file (another process holds it) must not cost the client its answer
    or the image count: the task cannot be recorded, so the finished answer is counted now."""
    import sqlite3

    state = tmp_path / "locked.db"
    gw = start_gateway(yaml_text=gateway_yaml(start_gateway.sim.url, state))
    holder = sqlite3.connect(state, isolation_level=None, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        r = requests.post(
            gw.url + "/api/v1/services/aigc/text2image/image-synthesis",
            json={
                "model": "wan2.2-t2i-flash",
                "input": {"prompt": "a kite"},
                "parameters": {"n": 1, "size": "1024*1024"},
            },
            headers=AUTH,
            timeout=30,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 200, r.text
    assert r.json()["output"]["task_status"] == "SUCCEEDED"
    assert gw.images("team-a", "wan2.2-t2i-flash") == 1
    still_serving(gw)
