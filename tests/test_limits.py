"""Per-key limits and quotas over real sockets: refused with 429 in the caller's dialect,
never reaching DashScope; reservations for images in flight and in async tasks; usage that
survives a restart; and the input limits (prompt length, header sizes)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import requests

from tests.conftest import Gateway, GatewayFactory
from tests.resilience_support import (
    IG,
    MM,
    A,
    B,
    GatewayProcess,
    assert_no_secret,
    body,
    config_yaml,
    sim_model_calls,
    upstream_yaml,
)
from tests.support import Live

ASYNC = {"X-DashScope-Async": "enable"}


def limited(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, limits: str, state: str = "s.db"
) -> Gateway:
    return start_gateway(
        yaml_text=config_yaml(
            [upstream_yaml("sim", sim.url)],
            tmp_path / state,
            key_a_extra="limits: {" + limits + "}",
        )
    )


def post(
    gw: Gateway,
    payload: dict[str, object],
    path: str = MM,
    headers: dict[str, str] = A,
    **extra: str,
) -> requests.Response:
    return requests.post(gw.url + path, json=payload, headers={**headers, **extra}, timeout=10)


def assert_throttled(r: requests.Response, code: str) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["code"] == code, r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert_no_secret(r.text)


def wait_task(gw: Gateway, task_id: str, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        out = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=A, timeout=5).json()
        if out["output"]["task_status"] == status or time.monotonic() > deadline:
            assert out["output"]["task_status"] == status, out
            return out
        time.sleep(0.05)


def test_requests_per_minute_in_every_dialect(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "requests_per_minute: 3")
    for _ in range(3):
        assert post(gw, body()).status_code == 200
    calls = sim_model_calls(sim)
    r = post(gw, body())
    assert_throttled(r, "Throttling.RateQuota")
    assert int(r.headers["Retry-After"]) <= 60
    r = requests.post(
        gw.url + "/v1/images/generations", json={"prompt": "a cat"}, headers=A, timeout=10
    )
    assert r.status_code == 429 and r.headers["Retry-After"], r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    r = requests.post(gw.url + "/aliyun/v1/images/generations", json=body(), headers=A, timeout=10)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert sim_model_calls(sim) == calls  # refusals never reach DashScope
    assert (
        gw.metric(
            "dashscope_proxy_limit_rejections_total", key="team-a", limit="requests_per_minute"
        )
        == 3
    )
    assert post(gw, body(), headers=B).status_code == 200  # other keys are not affected


def test_polls_are_not_rate_limited(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "requests_per_minute: 1")
    r = post(gw, body(model="wan2.6-t2i", n=1), path=IG, **ASYNC)
    assert r.status_code == 200, r.text
    assert_throttled(post(gw, body()), "Throttling.RateQuota")
    # Throttling a poll would lose a generation that is already billed.
    wait_task(gw, r.json()["output"]["task_id"], "SUCCEEDED")
    assert gw.images("team-a", "wan2.6-t2i") == 1


def test_concurrent_requests(start_gateway: GatewayFactory, sim: Live, tmp_path: Path) -> None:
    gw = limited(start_gateway, sim, tmp_path, "concurrent_requests: 1")
    slow: list[int] = []
    t = threading.Thread(target=lambda: slow.append(post(gw, body("[sim:slow=1]")).status_code))
    t.start()
    deadline = time.monotonic() + 5
    while sim_model_calls(sim) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert_throttled(post(gw, body()), "Throttling.RateQuota")
    t.join()
    assert slow == [200]
    # The slot is freed however a request ends: an upstream error, a client that left.
    assert post(gw, body("[sim:error=500]")).status_code == 500
    with contextlib.suppress(requests.RequestException):
        requests.post(gw.url + MM, json=body("[sim:slow=0.5]"), headers=A, timeout=0.1)
    time.sleep(0.8)
    assert post(gw, body()).status_code == 200


def test_the_slot_is_free_once_the_answer_arrives(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    """The gateway writes an answer before its own bookkeeping (metrics, access line),
    but frees the concurrency slot first: a client whose next request follows its answer
    at once, on another connection, is never refused."""
    gw = limited(start_gateway, sim, tmp_path, "concurrent_requests: 1")
    sessions = [requests.Session(), requests.Session()]
    codes = [
        sessions[i % 2].post(gw.url + MM, json=body(), headers=A, timeout=10).status_code
        for i in range(40)
    ]
    assert codes == [200] * 40
    # Each answer's bookkeeping still happened, once, with its status.
    assert [line["status"] for line in gw.log_lines() if line["route"] != "metrics"] == codes
    assert gw.images("team-a", "qwen-image-2.0") == 40


def test_daily_image_quota_uses_the_models_default_n(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "images_per_day: 5")
    assert gw.metric("dashscope_proxy_quota_remaining_images", key="team-a", window="day") == 5
    wan = body(model="wan2.6-t2i")  # no n: DashScope generates 4
    r = post(gw, wan)
    assert r.status_code == 200 and r.json()["usage"]["image_count"] == 4
    assert gw.metric("dashscope_proxy_quota_remaining_images", key="team-a", window="day") == 1
    calls = sim_model_calls(sim)
    r = post(gw, body(model="wan2.6-t2i", n=2))
    assert_throttled(r, "Throttling.AllocationQuota")
    assert (
        "2 image(s)" in r.json()["message"] and "1 of the daily quota of 5" in r.json()["message"]
    )
    assert 1 <= int(r.headers["Retry-After"]) <= 86400
    assert_throttled(post(gw, wan), "Throttling.AllocationQuota")  # default n=4 > 1
    assert sim_model_calls(sim) == calls
    assert post(gw, body(model="wan2.6-t2i", n=1)).status_code == 200
    assert gw.metric("dashscope_proxy_quota_remaining_images", key="team-a", window="day") == 0
    assert gw.images("team-a", "wan2.6-t2i") == 5
    r = requests.post(
        gw.url + "/v1/images/generations", json={"prompt": "a cat"}, headers=A, timeout=10
    )
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_openai_n_is_reserved_before_dashscope(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "images_per_month: 2")
    r = requests.post(
        gw.url + "/v1/images/generations",
        json={"prompt": "a cat", "n": 3, "response_format": "url"},
        headers=A,
        timeout=10,
    )
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
    assert sim_model_calls(sim) == 0
    r = requests.post(
        gw.url + "/v1/images/generations",
        json={"prompt": "a cat", "n": 2, "response_format": "url"},
        headers=A,
        timeout=10,
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert gw.metric("dashscope_proxy_quota_remaining_images", key="team-a", window="month") == 0


def test_async_tasks_hold_their_images_until_metered(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "images_per_day: 4")
    r = post(gw, body(model="wan2.6-t2i"), path=IG, **ASYNC)
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    # Nothing is metered yet, but the task may still generate 4 images.
    r = post(gw, body(n=1))
    assert_throttled(r, "Throttling.AllocationQuota")
    assert "held by requests and tasks still running" in r.json()["message"]
    wait_task(gw, task_id, "SUCCEEDED")
    assert gw.images("team-a", "wan2.6-t2i") == 4
    assert_throttled(post(gw, body(n=1)), "Throttling.AllocationQuota")
    wait_task(gw, task_id, "SUCCEEDED")  # a second poll counts nothing more
    assert gw.images("team-a", "wan2.6-t2i") == 4


def test_failed_task_frees_its_reservation(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "images_per_day: 4")
    r = post(gw, body("[sim:fail]", model="wan2.6-t2i"), path=IG, **ASYNC)
    assert r.status_code == 200, r.text
    assert_throttled(post(gw, body(n=1)), "Throttling.AllocationQuota")
    wait_task(gw, r.json()["output"]["task_id"], "FAILED")
    r = post(gw, body(model="wan2.6-t2i", n=4))
    assert r.status_code == 200, r.text
    assert gw.images("team-a", "wan2.6-t2i") == 4


def test_fewer_images_than_reserved_free_the_difference(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "images_per_day: 3")
    r = post(gw, body("[sim:error=inspection]", model="wan2.6-t2i", n=3))
    assert r.status_code == 400  # reserved 3, generated 0
    assert post(gw, body(model="wan2.6-t2i", n=3)).status_code == 200


def test_quota_usage_survives_a_restart(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "images_per_month: 5")
    assert post(gw, body(model="wan2.6-t2i")).status_code == 200  # 4 images
    start_gateway.stop(gw)
    gw = limited(start_gateway, sim, tmp_path, "images_per_month: 5")
    assert gw.metric("dashscope_proxy_quota_remaining_images", key="team-a", window="month") == 1
    assert_throttled(post(gw, body(model="wan2.6-t2i", n=2)), "Throttling.AllocationQuota")
    assert post(gw, body(model="wan2.6-t2i", n=1)).status_code == 200


def test_absurd_prompts_are_refused_before_dashscope(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = limited(start_gateway, sim, tmp_path, "requests_per_minute: 100")
    huge = "x" * 100_001
    r = post(gw, body(huge))
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"
    assert "prompt is too long" in r.json()["message"]
    r = requests.post(
        gw.url + "/v1/images/generations",
        json={"prompt": huge, "model": "some-new-model"},
        headers=A,
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
    r = requests.post(
        gw.url + "/aliyun/v1/images/generations", json=body(huge), headers=A, timeout=10
    )
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"]
    assert sim_model_calls(sim) == 0
    # A long-but-sane prompt still goes through (DashScope truncates, the gateway does not).
    assert post(gw, body("y" * 5000, model="wan2.6-t2i", n=1)).status_code == 200


def test_header_limits_of_the_server(sim: Live, tmp_path: Path) -> None:
    text = config_yaml([upstream_yaml("sim", sim.url)], tmp_path / "s.db")
    gw = GatewayProcess(text, tmp_path, "gw")
    try:
        secret = "Bearer gw-looks-like-a-key-" + "s" * 9000
        r = requests.post(gw.url + MM, json=body(), headers={"Authorization": secret}, timeout=10)
        # aiohttp alone would quote the header's first 100 bytes here and in its log.
        assert r.status_code == 400 and "gw-looks-like-a-key" not in r.text, r.text
        r = requests.get(gw.url + "/api/v1/tasks/x" + "a" * 9000, headers=A, timeout=10)
        assert r.status_code == 400 and "aaaa" not in r.text
        many = {f"X-H{i}": "v" for i in range(80)}
        r = requests.post(gw.url + MM, json=body(), headers={**A, **many}, timeout=10)
        assert r.status_code == 400
        assert requests.post(gw.url + MM, json=body(), headers=A, timeout=10).status_code == 200
    finally:
        gw.stop()
    assert "gw-looks-like-a-key" not in gw.log_path.read_text()
