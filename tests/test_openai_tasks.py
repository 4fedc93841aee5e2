"""Async-only models: a task object at once, then GET /v1/images/generations/{task_id}."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from tests.conftest import KEY_A, KEY_B, Gateway, GatewayFactory
from tests.openai_helpers import fetch, header, http, sim_generations
from tests.support import Live, LoopThread

ASYNC_ONLY = """
models:
  wan2.2-t2i-flash: {async_only: true}
  wan2.6-t2i: {async_only: true}
"""


@pytest.fixture
def gw(start_gateway: GatewayFactory) -> Gateway:
    return start_gateway(ASYNC_ONLY)


def wait_done(lt: LoopThread, gw: Gateway, task_id: str, key: str = KEY_A) -> dict[str, Any]:
    seen: list[str] = []
    for _ in range(50):
        status, body = http(lt, "GET", f"{gw.url}/v1/images/generations/{task_id}", key)
        assert status == 200, body
        seen.append(body["status"])
        if body["status"] not in ("QUEUED", "IN_PROGRESS"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"task never finished: {seen}")


def test_task_object_progress_result_and_metering_once(
    gw: Gateway, sim: Live, loop_thread: LoopThread
) -> None:
    status, task = http(
        loop_thread,
        "POST",
        gw.url + "/v1/images/generations",
        json={
            "model": "wan2.2-t2i-flash",
            "prompt": "a harbour",
            "n": 2,
            "size": "1024x1024",
            "response_format": "url",
        },
    )
    assert status == 200
    task_id = task["id"]
    assert task == {
        "id": task_id,
        "task_id": task_id,
        "object": "image.generation.task",
        "status": "QUEUED",
        "created_at": task["created_at"],
        "model": "wan2.2-t2i-flash",
        "prompt": "a harbour",
        "size": "1024x1024",
        "quality": "auto",
        "mode": "generation",
    }
    assert abs(task["created_at"] - time.time()) < 5
    [submit] = sim_generations(sim)
    assert header(submit, "X-DashScope-Async") == "enable"
    assert gw.images("team-a", "wan2.2-t2i-flash") == 0  # nothing generated yet

    done = wait_done(loop_thread, gw, task_id)
    assert done["status"] == "SUCCEEDED"
    assert len(done["data"]) == 2 and all(
        fetch(d["url"]).startswith(b"\x89PNG") for d in done["data"]
    )
    assert done["usage"]["generated_images"] == 2
    assert gw.images("team-a", "wan2.2-t2i-flash") == 2
    # Later polls (OpenAI or native) never count the task again.
    again = wait_done(loop_thread, gw, task_id)
    assert len(again["data"]) == 2
    status, native = http(loop_thread, "GET", f"{gw.api}/tasks/{task_id}")
    assert native["output"]["task_status"] == "SUCCEEDED"
    assert gw.images("team-a", "wan2.2-t2i-flash") == 2
    assert (
        gw.metric(
            "dashscope_proxy_requests_total",
            route="openai.tasks.get",
            key="team-a",
            model="wan2.2-t2i-flash",
            code="200",
        )
        >= 2
    )


def test_b64_task_result_and_messages_family(
    gw: Gateway, sim: Live, loop_thread: LoopThread
) -> None:
    status, task = http(
        loop_thread,
        "POST",
        gw.url + "/v1/images/generations",
        json={"model": "wan2.6-t2i", "prompt": "a garden", "seed": "11", "quality": "high"},
        key=KEY_B,
    )
    assert status == 200 and task["quality"] == "high" and task["size"] == "auto"
    [submit] = sim_generations(sim)
    assert submit["path"] == "/api/v1/services/aigc/image-generation/generation"
    assert submit["body"]["parameters"] == {"n": 1, "seed": 11}
    done = wait_done(loop_thread, gw, task["id"], KEY_B)
    [item] = done["data"]
    assert base64.b64decode(item["b64_json"]).startswith(b"\x89PNG")
    assert gw.images("team-b", "wan2.6-t2i") == 1


def test_only_the_submitting_key_reads_a_task(gw: Gateway, loop_thread: LoopThread) -> None:
    _, task = http(
        loop_thread,
        "POST",
        gw.url + "/v1/images/generations",
        json={"model": "wan2.6-t2i", "prompt": "a secret", "response_format": "url"},
    )
    other = http(loop_thread, "GET", f"{gw.url}/v1/images/generations/{task['id']}", KEY_B)
    missing = http(loop_thread, "GET", f"{gw.url}/v1/images/generations/no-such-task", KEY_B)
    # Exactly the answer for an id that does not exist: ids never leak.
    assert other[0] == missing[0] == 404
    assert other[1] == {
        "error": {
            "message": f"No image generation task {task['id']} found for this key.",
            "type": "invalid_request_error",
            "code": "task_not_found",
        }
    }
    assert missing[1]["error"]["code"] == "task_not_found"
    assert (
        http(loop_thread, "GET", f"{gw.url}/v1/images/generations/{task['id']}", "bad-key-123")[0]
        == 401
    )
    wait_done(loop_thread, gw, task["id"])
    assert gw.images("team-b", "wan2.6-t2i") == 0
    assert gw.images("team-a", "wan2.6-t2i") == 1


def test_failed_task_reports_the_error(gw: Gateway, loop_thread: LoopThread) -> None:
    _, task = http(
        loop_thread,
        "POST",
        gw.url + "/v1/images/generations",
        json={"model": "wan2.6-t2i", "prompt": "bad [sim:fail]"},
    )
    done = wait_done(loop_thread, gw, task["id"])
    assert done["status"] == "FAILED" and "data" not in done
    assert done["error"]["code"] == "content_policy_violation"
    assert gw.images("team-a", "wan2.6-t2i") == 0


def test_results_are_kept_for_the_retention_period(
    start_gateway: GatewayFactory, loop_thread: LoopThread
) -> None:
    gw = start_gateway(ASYNC_ONLY + "openai:\n  task_retention_seconds: 1\n")
    _, task = http(
        loop_thread,
        "POST",
        gw.url + "/v1/images/generations",
        json={"model": "wan2.6-t2i", "prompt": "short-lived", "response_format": "url"},
    )
    assert wait_done(loop_thread, gw, task["id"])["status"] == "SUCCEEDED"
    time.sleep(1.1)
    status, body = http(loop_thread, "GET", f"{gw.url}/v1/images/generations/{task['id']}")
    assert status == 404 and body["error"]["code"] == "task_not_found"


def test_native_tasks_are_not_openai_tasks(gateway: Gateway, loop_thread: LoopThread) -> None:
    status, submitted = http(
        loop_thread,
        "POST",
        gateway.api + "/services/aigc/text2image/image-synthesis",
        json={"model": "wan2.2-t2i-flash", "input": {"prompt": "x"}},
    )
    # (aiohttp's client sends no X-DashScope-Async: the simulator answers sync_call.)
    assert status == 200
    task_id = submitted["output"]["task_id"]
    status, body = http(loop_thread, "GET", f"{gateway.url}/v1/images/generations/{task_id}")
    assert status == 404 and body["error"]["code"] == "task_not_found"
