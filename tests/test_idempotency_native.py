"""`Idempotency-Key` on the DashScope-native endpoints and /aliyun/v1, over real sockets.

The DashScope SDK sends the header through `headers=`; `requests` is used where a test
must read the answer's own headers (`Idempotency-Replayed`, `Retry-After`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message

from tests.conftest import KEY_A, KEY_B, Gateway, GatewayFactory
from tests.resilience_support import queue_fault
from tests.support import Live

MULTIMODAL = "/services/aigc/multimodal-generation/generation"


def msgs(text: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"text": text}]}]


def generations(sim: Live) -> list[dict[str, Any]]:
    """What reached the simulator's generation endpoints (the startup key probe is a task
    GET, so it is not among them)."""
    seen = requests.get(sim.url + "/_sim/requests", timeout=5).json()["requests"]
    return [r for r in seen if "/services/" in r["path"]]


def native_post(
    gw: Gateway, body: dict[str, Any], idem: str | None, key: str = KEY_A, **headers: str
) -> requests.Response:
    sent = {"Authorization": f"Bearer {key}", **headers}
    if idem is not None:
        sent["Idempotency-Key"] = idem
    return requests.post(gw.api + MULTIMODAL, json=body, headers=sent, timeout=30)


def body(text: str = "a red fox", **params: Any) -> dict[str, Any]:
    return {"model": "qwen-image-2.0", "input": {"messages": msgs(text)}, "parameters": params}


def test_sync_replay_with_the_sdk_no_upstream_call_no_count(ds: Gateway, sim: Live) -> None:
    first = MultiModalConversation.call(
        model="qwen-image-2.0", messages=msgs("a fox"), n=2, headers={"Idempotency-Key": "k-1"}
    )
    again = MultiModalConversation.call(
        model="qwen-image-2.0", messages=msgs("a fox"), n=2, headers={"Idempotency-Key": "k-1"}
    )
    assert first.status_code == 200 and again.status_code == 200
    assert again.output == first.output and again.request_id == first.request_id
    assert len(generations(sim)) == 1
    assert ds.images("team-a", "qwen-image-2.0") == 2  # counted once
    assert ds.metric("dashscope_proxy_idempotent_replays_total", key="team-a") == 1
    # The raw answer says it is a replay; the first did not.
    raw = native_post(ds, body("a fox", n=2), "k-1")
    assert raw.status_code == 200 and raw.headers["Idempotency-Replayed"] == "true"
    assert raw.json()["request_id"] == first.request_id
    assert len(generations(sim)) == 1


def test_key_order_does_not_matter_other_content_is_422(gateway: Gateway, sim: Live) -> None:
    a = native_post(gateway, body(n=1, size="1024*1024"), "same")
    assert a.status_code == 200 and "Idempotency-Replayed" not in a.headers
    reordered = {"input": {"messages": msgs("a red fox")}, "model": "qwen-image-2.0"}
    reordered["parameters"] = {"size": "1024*1024", "n": 1}
    b = native_post(gateway, reordered, "same")
    assert b.status_code == 200 and b.headers["Idempotency-Replayed"] == "true"
    c = native_post(gateway, body("a blue fox"), "same")
    assert c.status_code == 422
    assert c.json()["code"] == "IdempotencyKeyReused" and "request_id" in c.json()
    # SSE on or off is part of the content: the same body streamed is another request.
    d = native_post(gateway, reordered, "same", **{"X-DashScope-SSE": "enable"})
    assert d.status_code == 422
    assert len(generations(sim)) == 1


def test_keys_are_per_gateway_key(gateway: Gateway, sim: Live) -> None:
    a = native_post(gateway, body(), "shared", key=KEY_A)
    b = native_post(gateway, body(), "shared", key=KEY_B)
    assert a.status_code == b.status_code == 200
    assert "Idempotency-Replayed" not in b.headers
    assert a.json()["request_id"] != b.json()["request_id"]
    assert len(generations(sim)) == 2


def test_malformed_key_is_400_and_nothing_runs(gateway: Gateway, sim: Live) -> None:
    for bad in ("x" * 256, "caf\u00e9", "tab\there"):
        r = requests.post(
            gateway.api + MULTIMODAL,
            json=body(),
            headers={"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": bad.encode("utf-8")},  # type: ignore[dict-item]
            timeout=10,
        )
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["code"] == "InvalidParameter"
    assert generations(sim) == []


def test_async_submit_replayed_returns_the_same_task(ds: Gateway, sim: Live) -> None:
    kwargs: dict[str, Any] = {"model": "wan2.2-t2i-plus", "prompt": "a cat", "n": 1}
    first = ImageSynthesis.async_call(headers={"Idempotency-Key": "job-1"}, **kwargs)
    again = ImageSynthesis.async_call(headers={"Idempotency-Key": "job-1"}, **kwargs)
    assert first.status_code == again.status_code == 200
    assert again.output.task_id == first.output.task_id
    assert len(generations(sim)) == 1
    done = ImageSynthesis.wait(again)
    assert done.output.task_status == "SUCCEEDED"
    assert ds.images("team-a", "wan2.2-t2i-plus") == 1


def test_sse_replay_is_the_whole_stream(ds: Gateway, sim: Live) -> None:
    def stream() -> list[Any]:
        return list(
            ImageGeneration.call(
                model="wan2.6-image",
                messages=[Message(role="user", content=[{"text": "a tutorial"}])],
                stream=True,
                enable_interleave=True,
                max_images=2,
                size="1280*1280",
                headers={"Idempotency-Key": "sse-1"},
            )
        )

    first, again = stream(), stream()
    assert len(first) >= 2 and all(c.status_code == 200 for c in first)
    assert [c.output for c in again] == [c.output for c in first]
    assert again[-1].usage["image_count"] == 2
    assert len(generations(sim)) == 1
    assert ds.images("team-a", "wan2.6-image") == 2
    assert ds.metric("dashscope_proxy_idempotent_replays_total", key="team-a") == 1


def test_concurrent_repeat_is_409_with_retry_after(gateway: Gateway, sim: Live) -> None:
    slow = body("a slow fox [sim:slow=1.5]")
    results: list[requests.Response] = []
    first = threading.Thread(target=lambda: results.append(native_post(gateway, slow, "c-1")))
    first.start()
    deadline = time.monotonic() + 5
    while not generations(sim) and time.monotonic() < deadline:
        time.sleep(0.02)
    during = native_post(gateway, slow, "c-1")
    first.join()
    assert during.status_code == 409
    assert during.json()["code"] == "IdempotencyInProgress"
    assert int(during.headers["Retry-After"]) >= 1
    after = native_post(gateway, slow, "c-1")
    assert after.status_code == 200 and after.headers["Idempotency-Replayed"] == "true"
    assert after.json() == results[0].json()
    assert len(generations(sim)) == 1


def test_refusals_before_dashscope_are_not_kept(start_gateway: GatewayFactory, sim: Live) -> None:
    gw = start_gateway()
    # A gateway refusal (the prompt limit) is not kept: the corrected request runs.
    refused = native_post(gw, body("x" * 100_001), "fix-me")
    assert refused.status_code == 400 and "Idempotency-Replayed" not in refused.headers
    fixed = native_post(gw, body("a short prompt"), "fix-me")
    assert fixed.status_code == 200 and "Idempotency-Replayed" not in fixed.headers
    # DashScope's throttling ran nothing: not kept either, the retry runs.
    queue_fault(sim, "error=429")
    throttled = native_post(gw, body("throttled"), "t-1")
    assert throttled.status_code == 429
    retried = native_post(gw, body("throttled"), "t-1")
    assert retried.status_code == 200 and "Idempotency-Replayed" not in retried.headers
    # A DashScope error for the request itself is kept, like any answer it gave.
    queue_fault(sim, "error=500")
    failed = native_post(gw, body("failing"), "e-1")
    assert failed.status_code == 500
    replayed = native_post(gw, body("failing"), "e-1")
    assert replayed.status_code == 500 and replayed.headers["Idempotency-Replayed"] == "true"
    assert replayed.json() == failed.json()


def test_upstream_timeout_is_kept_never_run_twice(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Any
) -> None:
    from tests.conftest import UPSTREAM_KEY

    gw = start_gateway(
        yaml_text=f"""
server: {{host: 127.0.0.1, port: 0, usage_log: {tmp_path / "usage.jsonl"}}}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
    timeouts: {{connect: 2, read: 0.5, total: 5}}
keys:
  - {{name: team-a, key: {KEY_A}}}
state: {{path: {tmp_path / "state.db"}}}
"""
    )
    slow = body("a very slow fox [sim:slow=2]")
    lost = native_post(gw, slow, "to-1")
    assert lost.status_code == 504
    again = native_post(gw, slow, "to-1")
    assert again.status_code == 504 and again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["code"] == lost.json()["code"]
    assert len(generations(sim)) == 1


def test_kept_answers_survive_a_restart(start_gateway: GatewayFactory, sim: Live) -> None:
    gw = start_gateway()
    first = native_post(gw, body(), "r-1")
    start_gateway.stop(gw)
    gw2 = start_gateway()
    again = native_post(gw2, body(), "r-1")
    assert again.status_code == 200 and again.headers["Idempotency-Replayed"] == "true"
    assert again.json() == first.json()
    assert len(generations(sim)) == 1


def test_aliyun_replay(gateway: Gateway, sim: Live) -> None:
    sent = {"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "al-1"}
    url = gateway.url + "/aliyun/v1/images/generations"
    a = requests.post(url, json=body(), headers=sent, timeout=30)
    b = requests.post(url, json=body(), headers=sent, timeout=30)
    assert a.status_code == b.status_code == 200
    assert b.headers["Idempotency-Replayed"] == "true" and b.json() == a.json()
    c = requests.post(url, json=body("other"), headers=sent, timeout=30)
    assert c.status_code == 422
    assert c.json()["error"]["code"] == "idempotency_key_reused"
    assert len(generations(sim)) == 1


def test_a_replay_uses_no_limit_or_quota(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Any
) -> None:
    from tests.resilience_support import team_a_yaml

    text = team_a_yaml(
        sim.url,
        usage_log=tmp_path / "usage.jsonl",
        state=f"  path: {tmp_path / 'state.db'}",
        limits="images_per_day: 2, requests_per_minute: 2",
    )
    gw = start_gateway(yaml_text=text)
    first = native_post(gw, body(n=2), "quota-1")
    assert first.status_code == 200
    for _ in range(3):  # more than the rate limit allows, and past the day's images
        again = native_post(gw, body(n=2), "quota-1")
        assert again.status_code == 200 and again.headers["Idempotency-Replayed"] == "true"
    # The limits saw one request and two images: a new request still has its second slot,
    # and is refused for the images it would add, not for the replays.
    refused = native_post(gw, body("another", n=1), "quota-2")
    assert refused.status_code == 429
    assert refused.json()["code"] == "Throttling.AllocationQuota"
    assert len(generations(sim)) == 1
    assert gw.metric("dashscope_proxy_idempotent_replays_total", key="team-a") == 3


def test_image2image_submit_replayed(gateway: Gateway, sim: Live) -> None:
    payload = {
        "model": "wan2.5-i2i-preview",
        "input": {"prompt": "make it snow", "images": ["https://example.com/a.png"]},
        "parameters": {"n": 1},
    }
    sent = {
        "Authorization": f"Bearer {KEY_A}",
        "Idempotency-Key": "i2i-1",
        "X-DashScope-Async": "enable",
    }
    url = gateway.api + "/services/aigc/image2image/image-synthesis"
    first = requests.post(url, json=payload, headers=sent, timeout=30)
    again = requests.post(url, json=payload, headers=sent, timeout=30)
    assert first.status_code == 200, first.text
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["output"]["task_id"] == first.json()["output"]["task_id"]
    assert len(generations(sim)) == 1
