"""POST /aliyun/v1/images/generations (plain HTTP): one path, every model, the right endpoint."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import UPSTREAM_KEY, Gateway, GatewayFactory, gateway_yaml
from tests.openai_helpers import fetch, header, http, sim_generations
from tests.support import Live, LoopThread


def native(model: str, text: str, **parameters: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
        "parameters": parameters,
    }


def test_sync_model_passes_the_upstream_body_through(
    gateway: Gateway, sim: Live, loop_thread: LoopThread
) -> None:
    body = native(
        "qwen-image-2.0-pro",
        "A white mechanical cat",
        size="2048*2048",
        n=2,
        prompt_extend=True,
        watermark=False,
    )
    status, answer = http(
        loop_thread, "POST", gateway.url + "/aliyun/v1/images/generations", json=body
    )
    assert status == 200
    assert answer["usage"]["image_count"] == 2
    urls = [c["message"]["content"][0]["image"] for c in answer["output"]["choices"]]
    assert len(urls) == 2 and fetch(urls[0]).startswith(b"\x89PNG")
    [seen] = sim_generations(sim)
    assert seen["path"] == "/api/v1/services/aigc/multimodal-generation/generation"
    assert seen["body"] == body
    assert header(seen, "Authorization") == f"Bearer {UPSTREAM_KEY}"
    assert gateway.images("team-a", "qwen-image-2.0-pro") == 2
    assert (
        gateway.metric(
            "dashscope_proxy_requests_total",
            route="aliyun.generations",
            key="team-a",
            model="qwen-image-2.0-pro",
            code="200",
        )
        == 1
    )


def test_task_family_goes_to_the_task_endpoint(
    gateway: Gateway, sim: Live, loop_thread: LoopThread
) -> None:
    body = native("wan2.2-t2i-flash", "a river", size="1024*1024", n=2, negative_prompt="people")
    status, answer = http(
        loop_thread, "POST", gateway.url + "/aliyun/v1/images/generations", json=body
    )
    assert status == 200 and answer["output"]["task_status"] == "PENDING"
    [seen] = sim_generations(sim)
    assert seen["path"] == "/api/v1/services/aigc/text2image/image-synthesis"
    assert header(seen, "X-DashScope-Async") == "enable"
    assert seen["body"] == {
        "model": "wan2.2-t2i-flash",
        "input": {"prompt": "a river", "negative_prompt": "people"},
        "parameters": {"size": "1024*1024", "n": 2},
    }
    task_id = answer["output"]["task_id"]
    assert gateway.images("team-a", "wan2.2-t2i-flash") == 0
    for _ in range(40):
        _, polled = http(loop_thread, "GET", f"{gateway.api}/tasks/{task_id}")
        if polled["output"]["task_status"] == "SUCCEEDED":
            break
        time.sleep(0.05)
    assert polled["output"]["task_status"] == "SUCCEEDED"
    http(loop_thread, "GET", f"{gateway.api}/tasks/{task_id}")
    assert gateway.images("team-a", "wan2.2-t2i-flash") == 2  # once, on the first SUCCEEDED


def test_mode_override_and_alias(
    start_gateway: GatewayFactory, sim: Live, loop_thread: LoopThread
) -> None:
    gw = start_gateway("models:\n  wan2.6-t2i: {mode: async}\n  house: {target: qwen-image-max}\n")
    status, answer = http(
        loop_thread,
        "POST",
        gw.url + "/aliyun/v1/images/generations",
        json=native("wan2.6-t2i", "a kite", n=1),
    )
    assert status == 200 and answer["output"]["task_status"] == "PENDING"
    status, answer = http(
        loop_thread,
        "POST",
        gw.url + "/aliyun/v1/images/generations",
        json=native("house", "a house"),
    )
    assert status == 200 and answer["usage"]["image_count"] == 1
    wan, house = sim_generations(sim)
    assert wan["path"] == "/api/v1/services/aigc/image-generation/generation"
    assert house["body"]["model"] == "qwen-image-max"
    assert gw.images("team-a", "house") == 1


def test_dashscope_errors_pass_through(gateway: Gateway, loop_thread: LoopThread) -> None:
    status, answer = http(
        loop_thread,
        "POST",
        gateway.url + "/aliyun/v1/images/generations",
        json=native("qwen-image-2.0", "x [sim:error=429]"),
    )
    assert status == 429
    assert answer["code"] == "Throttling.RateQuota" and "request_id" in answer
    assert gateway.images("team-a", "qwen-image-2.0") == 0


def test_model_no_upstream_serves(
    start_gateway: GatewayFactory, sim: Live, loop_thread: LoopThread, tmp_path: Any
) -> None:
    text = gateway_yaml(sim.url, tmp_path / "s.db").replace(
        f"api_key: {UPSTREAM_KEY}", f'api_key: {UPSTREAM_KEY}\n    models: ["qwen-image*"]'
    )
    gw = start_gateway(yaml_text=text)
    status, answer = http(
        loop_thread,
        "POST",
        gw.url + "/aliyun/v1/images/generations",
        json=native("gpt-image-1", "x"),
    )
    assert (status, answer) == (
        400,
        {
            "error": {
                "message": "only aliyun channel is supported on /aliyun/v1/images/generations",
                "type": "invalid_request_error",
                "code": "invalid_request",
            }
        },
    )
    assert sim_generations(sim) == []


def test_gateway_errors_are_openai_shaped(gateway: Gateway, loop_thread: LoopThread) -> None:
    url = gateway.url + "/aliyun/v1/images/generations"
    assert http(loop_thread, "POST", url, key="bad-key-123", json=native("qwen-image", "x")) == (
        401,
        {
            "error": {
                "message": "Invalid API-key provided.",
                "type": "authentication_error",
                "code": "invalid_api_key",
            }
        },
    )
    from tests.conftest import KEY_B

    status, body = http(loop_thread, "POST", url, key=KEY_B, json=native("wanx-v1", "x"))
    assert status == 403 and body["error"]["type"] == "permission_error"
    status, body = http(loop_thread, "POST", url, json={"input": {}})
    assert status == 400 and body["error"]["code"] == "missing_model"
