"""Byte-level checks with plain HTTP: SSE framing, headers, error bodies, /_sim endpoints, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import requests
from sim_helpers import SimServer

from proxy.simulator.__main__ import parse_args

E1 = "/services/aigc/multimodal-generation/generation"
E3 = "/services/aigc/text2image/image-synthesis"


def post(
    sim: SimServer, path: str, body: Any, headers: dict[str, str] | None = None, **kw: Any
) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{sim.base_url}{path}",
        data=data,
        headers={
            "Authorization": f"Bearer {sim.key}",
            "Content-Type": "application/json; charset=utf-8",
            **(headers or {}),
        },
        timeout=10,
        **kw,
    )


def interleave_body(stream: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"enable_interleave": True, "max_images": 2}
    if stream:
        params["stream"] = True
    return {
        "model": "wan2.6-image",
        "input": {"messages": [{"role": "user", "content": [{"text": "tutorial"}]}]},
        "parameters": params,
    }


def parse_frames(raw: bytes) -> list[list[str]]:
    text = raw.decode()
    assert text.endswith("\n\n")
    return [frame.split("\n") for frame in text[:-2].split("\n\n")]


def test_sse_framing_is_exact(sim: SimServer) -> None:
    response = post(sim, E1, interleave_body(), headers={"x-dashscope-sse": "ENABLE"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream;charset=UTF-8"
    frames = parse_frames(response.content)
    assert len(frames) == 5
    for number, frame in enumerate(frames, start=1):
        assert frame[:3] == [f"id:{number}", "event:result", ":HTTP_STATUS/200"]
        assert len(frame) == 4 and frame[3].startswith("data:")
        payload = json.loads(frame[3][len("data:") :])
        assert isinstance(payload["output"], dict)
        assert payload["output"]["choices"][0]["message"]["role"] == "assistant"
    assert b"[DONE]" not in response.content
    last = json.loads(frames[-1][3][5:])
    assert last["output"]["finished"] is True
    assert last["usage"]["image_count"] == 2


def test_parameters_stream_without_header_streams(sim: SimServer) -> None:
    response = post(sim, E1, interleave_body(stream=True))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert len(parse_frames(response.content)) == 5


def test_interleave_without_stream_is_rejected(sim: SimServer) -> None:
    response = post(sim, E1, interleave_body())
    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParameter"


def test_sse_error_frame_has_no_space(sim: SimServer) -> None:
    body = interleave_body()
    body["input"]["messages"][0]["content"][0]["text"] = "x [sim:sse-error=429]"
    raw = post(sim, E1, body, headers={"X-DashScope-SSE": "enable"}).content
    frames = parse_frames(raw)
    assert frames[1][:3] == ["id:2", "event:error", ":HTTP_STATUS/429"]
    error = json.loads(frames[1][3][5:])
    assert error["code"] == "Throttling.RateQuota" and error["request_id"]


def test_response_headers(sim: SimServer) -> None:
    response = post(
        sim,
        E1,
        {
            "model": "qwen-image-2.0",
            "input": {"messages": [{"role": "user", "content": [{"text": "a"}]}]},
        },
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["x-dashscope-call-gateway"] == "true"
    assert response.headers["x-request-id"] == response.json()["request_id"]
    assert int(response.headers["req-cost-time"]) >= 0


def test_request_shape_errors(sim: SimServer) -> None:
    cases = [
        (b"{not json", "InvalidParameter"),
        ({"input": {"prompt": "x"}}, "BadRequest.EmptyModel"),
        ({"model": "qwen-image-plus"}, "BadRequest.EmptyInput"),
        ({"model": "nope", "input": {"prompt": "x"}}, "InvalidParameter"),
    ]
    for body, code in cases:
        response = post(sim, E3, body, headers={"X-DashScope-Async": "enable"})
        assert response.status_code == 400, body
        assert response.json()["code"] == code, body


def test_missing_key_and_unknown_path(sim: SimServer) -> None:
    response = requests.get(f"{sim.base_url}/tasks/abc", timeout=10)
    assert response.status_code == 401
    assert response.json()["code"] == "InvalidApiKey"
    unknown = post(sim, "/services/aigc/nothing/here", {})
    assert unknown.status_code == 400
    assert unknown.json()["message"].startswith("url error")


def test_wrong_endpoint_for_model(sim: SimServer) -> None:
    body = {"model": "wan2.2-t2i-flash", "input": {"messages": []}}
    response = post(sim, E1, body)
    assert response.status_code == 400


def test_requests_are_recorded_and_cleared(sim: SimServer) -> None:
    body = {"model": "qwen-image-plus", "input": {"prompt": "a"}, "parameters": {"seed": 5}}
    post(sim, E3, body, headers={"X-DashScope-Async": "enable"}, params={"q": "1"})
    records = sim.sim("GET", "/_sim/requests").json()["requests"]
    assert len(records) == 1
    record = records[0]
    assert record["method"] == "POST"
    assert record["path"] == f"/api/v1{E3}"
    assert record["query"] == {"q": "1"}
    assert record["headers"]["Authorization"] == f"Bearer {sim.key}"
    assert record["body"]["parameters"]["seed"] == 5
    assert record["body_length"] == len(json.dumps(body))
    assert sim.sim("DELETE", "/_sim/requests").status_code == 200
    assert sim.sim("GET", "/_sim/requests").json()["requests"] == []


def test_upload_host_needs_a_valid_policy(sim: SimServer) -> None:
    files = {"file": ("a.png", b"data")}
    forged = {"key": "dashscope-instant/x/a.png", "policy": "e30=", "Signature": "nope"}
    response = requests.post(f"{sim.root}/_sim/oss", data=forged, files=files, timeout=10)
    assert response.status_code == 403
    policy = requests.get(
        f"{sim.base_url}/uploads",
        params={"action": "getPolicy", "model": "wan2.6-image"},
        headers={"Authorization": f"Bearer {sim.key}"},
        timeout=10,
    ).json()["data"]
    assert policy["upload_host"] == f"{sim.root}/_sim/oss"
    form = {
        "OSSAccessKeyId": policy["oss_access_key_id"],
        "Signature": policy["signature"],
        "policy": policy["policy"],
        "key": policy["upload_dir"] + "/a.png",
        "success_action_status": "200",
    }
    assert requests.post(policy["upload_host"], data=form, files=files, timeout=10).ok
    outside = {**form, "key": "elsewhere/a.png"}
    response = requests.post(policy["upload_host"], data=outside, files=files, timeout=10)
    assert response.status_code == 403


def test_cli_arguments() -> None:
    host, port, settings = parse_args(
        ["--port", "9000", "--key", "k1", "--key", "k2", "--pending-seconds", "1", "--zero-delay"]
    )
    assert (host, port) == ("127.0.0.1", 9000)
    assert settings.api_keys == frozenset({"k1", "k2"})
    assert settings.pending_seconds == 1 and settings.zero_delay
    assert parse_args(["--any-key"])[2].api_keys == frozenset()
    assert parse_args([])[2].api_keys == frozenset({"sk-sim-upstream"})


def test_module_entry_point_serves() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.simulator", "--port", "0", "--zero-delay"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("DashScope simulator at http://127.0.0.1:")
        base = line.rsplit(" ", 1)[-1]
        assert base.endswith("/api/v1")
        answer = requests.get(
            f"{base}/tasks/x", headers={"Authorization": "Bearer sk-sim-upstream"}, timeout=10
        )
        assert answer.json()["output"]["task_status"] == "UNKNOWN"
    finally:
        process.terminate()
        assert process.wait(10) == 0
