"""What cannot be counted is counted as such, over real sockets.

An answer DashScope may have generated images for, but that the gateway never received
whole (a read timeout, a truncated body, a 200 that is not JSON), grows
`dashscope_proxy_unmetered_answers_total{reason}` and writes a ledger line with
`"images": null`, on `/api/v1` (the relay) and `/v1` (the OpenAI path). Answers DashScope
refused with an error status never do. And a client that leaves while DashScope answers is
logged 499, its images still counted.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from proxy.upstream.probe import PROBE_TASK_ID
from tests.conftest import KEY_A, Gateway, GatewayFactory
from tests.openai_helpers import client
from tests.ops_support import in_background, wait_for
from tests.resilience_support import IG, MM, A, body, queue_fault, sim_requests, upstream_yaml
from tests.support import Live

UNMETERED = "dashscope_proxy_unmetered_answers_total"
REASONS = ("read_timeout", "truncated", "invalid_json", "drain_cut")


def gateway(start_gateway: GatewayFactory, sim: Live, tmp_path: Path, read: float = 30) -> Gateway:
    """One upstream (the simulator, `timeouts.read` = `read`), a usage ledger."""
    upstream = upstream_yaml(
        "sim", sim.url, extra=f"timeouts: {{read: {read}}}\ncircuit_breaker: {{failures: 1000}}"
    )
    return start_gateway(
        yaml_text=f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {tmp_path / "usage.jsonl"}
upstreams:
{upstream}
keys:
  - name: team-a
    key: {KEY_A}
state:
  path: {tmp_path / "state.db"}
"""
    )


def ledger(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "usage.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def unmetered(gw: Gateway) -> dict[str, float]:
    return {reason: gw.metric(UNMETERED, reason=reason) for reason in REASONS}


def only(reason: str, count: int = 1) -> dict[str, float]:
    return {r: float(count if r == reason else 0) for r in REASONS}


def null_line(tmp_path: Path, reason: str) -> dict[str, Any]:
    (line,) = [x for x in ledger(tmp_path) if x["images"] is None]
    assert line["reason"] == reason
    return line


def probed(sim: Live) -> None:
    """The gateway's startup key probe has reached the simulator (so a queued poll fault is
    taken by the poll under test, not by the probe)."""
    deadline = time.monotonic() + 10
    while not any(PROBE_TASK_ID in str(r.get("path")) for r in sim_requests(sim)):
        assert time.monotonic() < deadline, "no key probe"
        time.sleep(0.05)


# ----------------------------------------------------------------------- /api/v1


def test_native_read_timeout_is_counted_unmetered(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = gateway(start_gateway, sim, tmp_path, read=0.3)
    # Every reason exists from the start, at 0: increase() and the alert see the first.
    assert unmetered(gw) == only("read_timeout", 0)
    r = requests.post(gw.url + MM, json=body("[sim:slow=1]"), headers=A, timeout=10)
    assert r.status_code == 504, r.text
    assert unmetered(gw) == only("read_timeout")
    line = null_line(tmp_path, "read_timeout")
    (access,) = gw.log_lines()
    assert {k: line[k] for k in ("key", "model", "route", "upstream", "task_id")} == {
        "key": "team-a",
        "model": "qwen-image-2.0",
        "route": "multimodal-generation",
        "upstream": "sim",
        "task_id": None,
    }
    assert line["request_id"] == access["request_id"]
    assert gw.images("team-a", "qwen-image-2.0") == 0


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
def test_native_truncated_and_invalid_answers_are_counted_unmetered(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, sse: bool
) -> None:
    gw = gateway(start_gateway, sim, tmp_path)
    headers = {**A, "X-DashScope-SSE": "enable"} if sse else A
    if sse:  # streamed as it comes: the client sees the stream cut
        with pytest.raises(requests.RequestException):
            requests.post(gw.url + MM, json=body("[sim:truncate]"), headers=headers, timeout=10)
    else:  # read whole before relaying: a cut body is a 502
        r = requests.post(gw.url + MM, json=body("[sim:truncate]"), headers=headers, timeout=10)
        assert r.status_code == 502, r.text
    assert unmetered(gw) == only("truncated")
    assert null_line(tmp_path, "truncated")["route"] == "multimodal-generation"

    r = requests.post(gw.url + MM, json=body("[sim:badjson]"), headers=headers, timeout=10)
    assert r.status_code == 200  # relayed unchanged: the client may make more of it
    assert unmetered(gw) == {**only("truncated"), "invalid_json": 1.0}
    assert [x["reason"] for x in ledger(tmp_path)] == ["truncated", "invalid_json"]
    assert gw.images("team-a", "qwen-image-2.0") == 0


def test_native_task_poll_cut_is_counted_with_its_task(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = gateway(start_gateway, sim, tmp_path)
    probed(sim)
    r = requests.post(
        gw.url + IG,
        json=body(model="wan2.6-t2i", n=1),
        headers={**A, "X-DashScope-Async": "enable"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    time.sleep(0.8)  # SUCCEEDED by now
    queue_fault(sim, "truncate", polls=True)
    r = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=A, timeout=10)
    assert r.status_code == 502, r.text
    assert unmetered(gw) == only("truncated")
    line = null_line(tmp_path, "truncated")
    assert (line["task_id"], line["route"], line["model"]) == (task_id, "tasks.get", "wan2.6-t2i")
    # The next poll counts it after all: a null line with a task id is settled by a later one.
    r = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=A, timeout=10)
    assert r.status_code == 200 and r.json()["output"]["task_status"] == "SUCCEEDED"
    assert [(x["task_id"], x["images"]) for x in ledger(tmp_path)] == [
        (task_id, None),
        (task_id, 1),
    ]
    # A task known final is no longer an answer that could carry a new result.
    queue_fault(sim, "truncate", polls=True)
    r = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=A, timeout=10)
    assert r.status_code == 502
    assert unmetered(gw) == only("truncated")


def test_answers_dashscope_refused_are_never_unmetered(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = gateway(start_gateway, sim, tmp_path)
    for fault, status in (("error=500", 500), ("error=429", 429), ("error=inspection", 400)):
        r = requests.post(gw.url + MM, json=body(f"[sim:{fault}]"), headers=A, timeout=10)
        assert r.status_code == status, r.text
    with pytest.raises(openai.InternalServerError):
        client(gw).images.generate(
            model="qwen-image-2.0", prompt="[sim:error=500]", response_format="url"
        )
    # A refusal whose body is cut short is still a refusal: nothing DashScope generated.
    r = requests.post(
        gw.url + MM, json=body("[sim:error=500] [sim:truncate]"), headers=A, timeout=10
    )
    assert r.status_code >= 500
    with pytest.raises(openai.APIStatusError):
        client(gw).images.generate(
            model="qwen-image-2.0", prompt="[sim:error=500] [sim:truncate]", response_format="url"
        )
    assert unmetered(gw) == only("read_timeout", 0)
    assert ledger(tmp_path) == []


# ---------------------------------------------------------------------------- /v1


def test_openai_read_timeout_truncated_and_invalid_json(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = gateway(start_gateway, sim, tmp_path, read=0.3)
    sdk = client(gw)
    for prompt, status in (("[sim:slow=1]", 504), ("[sim:truncate]", 502), ("[sim:badjson]", 502)):
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.images.generate(model="qwen-image-2.0", prompt=prompt, response_format="url")
        assert raised.value.status_code == status
    assert unmetered(gw) == {"read_timeout": 1, "truncated": 1, "invalid_json": 1, "drain_cut": 0}
    lines = ledger(tmp_path)
    assert [x["reason"] for x in lines] == ["read_timeout", "truncated", "invalid_json"]
    assert {(x["route"], x["model"], x["upstream"], x["images"]) for x in lines} == {
        ("openai.generations", "qwen-image-2.0", "sim", None)
    }
    assert gw.images("team-a", "qwen-image-2.0") == 0


def test_openai_task_poll_cut_is_counted_with_its_task(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = gateway(start_gateway, sim, tmp_path)
    probed(sim)
    t, result = in_background(
        lambda: client(gw).images.generate(
            model="wan2.2-t2i-flash", prompt="a pagoda", response_format="url"
        )
    )
    # Submitted; the gateway's own first poll comes a second later and takes the fault.
    wait_for(lambda: any("/services/" in r["path"] for r in sim_requests(sim)), 10, "submit")
    queue_fault(sim, "badjson", polls=True)
    t.join(15)
    assert isinstance(result[0], openai.APIStatusError) and result[0].status_code == 502
    assert unmetered(gw) == only("invalid_json")
    line = null_line(tmp_path, "invalid_json")
    polls = [r["path"] for r in sim_requests(sim) if r["path"].startswith("/api/v1/tasks/")]
    assert line["task_id"] and polls[-1].endswith(line["task_id"])
    assert line["route"] == "openai.generations"


# ----------------------------------------------------------------- client gone: 499


def test_a_client_that_leaves_is_logged_499_and_its_images_counted(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = gateway(start_gateway, sim, tmp_path)
    payload = json.dumps(body("[sim:slow=1]", n=2)).encode()
    head = (
        f"POST {MM} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_A}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.live.port)) as sock:
        sock.sendall(head + payload)
        time.sleep(0.4)  # the gateway is waiting for DashScope
    deadline = time.monotonic() + 10
    while not gw.log_lines():
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    (line,) = gw.log_lines()
    assert (line["status"], line["images"]) == (499, 2)
    assert gw.images("team-a", "qwen-image-2.0") == 2
    assert [x["images"] for x in ledger(tmp_path)] == [2]
    assert unmetered(gw) == only("read_timeout", 0)  # it was received whole
    # A client that stays gets its 200, as before.
    r = requests.post(gw.url + MM, json=body(), headers=A, timeout=10)
    assert r.status_code == 200 and gw.log_lines()[-1]["status"] == 200
