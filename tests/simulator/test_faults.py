"""Fault directives end to end: in the prompt, in the X-Sim-Fault header, and queued."""

from __future__ import annotations

import time

import pytest
import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message
from sim_helpers import SimServer


def qwen(prompt: str, **kwargs: object) -> object:
    messages = [{"role": "user", "content": [{"text": prompt}]}]
    return MultiModalConversation.call(model="qwen-image-2.0", messages=messages, **kwargs)


def raw_e1(sim: SimServer, prompt: str, headers: dict[str, str] | None = None) -> requests.Response:
    body = {
        "model": "qwen-image-2.0",
        "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
        "parameters": {},
    }
    return requests.post(
        f"{sim.base_url}/services/aigc/multimodal-generation/generation",
        json=body,
        headers={"Authorization": f"Bearer {sim.key}", **(headers or {})},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("401", 401, "InvalidApiKey"),
        ("403", 403, "AccessDenied"),
        ("429", 429, "Throttling.RateQuota"),
        ("inspection", 400, "DataInspectionFailed"),
        ("500", 500, "InternalError"),
        ("503", 503, "ServiceUnavailable"),
    ],
)
def test_error_directive_in_prompt(sim: SimServer, kind: str, status: int, code: str) -> None:
    rsp = qwen(f"a cat [sim:error={kind}]")
    assert (rsp.status_code, rsp.code) == (status, code)
    assert rsp.message
    assert rsp.request_id


def test_error_directive_in_input_prompt(sim: SimServer) -> None:
    rsp = ImageSynthesis.async_call(model="qwen-image-plus", prompt="x [sim:error=429]")
    assert (rsp.status_code, rsp.code) == (429, "Throttling.RateQuota")


def test_error_body_is_dashscope_json(sim: SimServer) -> None:
    response = raw_e1(sim, "[sim:error=500]")
    assert response.status_code == 500
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"request_id", "code", "message"}
    assert body["request_id"] == response.headers["x-request-id"]


def test_header_fault(sim: SimServer) -> None:
    rsp = qwen("a cat", headers={"X-Sim-Fault": "error=429"})
    assert (rsp.status_code, rsp.code) == (429, "Throttling.RateQuota")


def test_slow_directive(sim: SimServer) -> None:
    started = time.monotonic()
    rsp = qwen("a cat [sim:slow=0.4]")
    assert rsp.status_code == 200
    assert time.monotonic() - started >= 0.4


def test_truncate_directive(sim: SimServer) -> None:
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        raw_e1(sim, "[sim:truncate]")
    with pytest.raises(requests.exceptions.RequestException):
        qwen("a cat [sim:truncate]")


def test_badjson_directive(sim: SimServer) -> None:
    response = raw_e1(sim, "[sim:badjson]")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        response.json()


def test_pad_directive(sim: SimServer) -> None:
    response = raw_e1(sim, "[sim:pad=20000]")
    assert abs(len(response.content) - 20000) < 50
    assert response.json()["output"]["sim_padding"].startswith("xxx")


def test_fail_directive_text2image_puts_code_in_output(sim: SimServer) -> None:
    rsp = ImageSynthesis.call(model="wan2.2-t2i-flash", prompt="p [sim:fail]", n=1)
    assert rsp.status_code == 200
    assert rsp.output.task_status == "FAILED"
    assert rsp.output.code == "DataInspectionFailed"
    assert rsp.output.message


def test_fail_directive_wan26_puts_code_at_top_level(sim: SimServer) -> None:
    task = ImageGeneration.async_call(
        model="wan2.6-t2i", messages=[Message(role="user", content=[{"text": "p [sim:fail]"}])]
    )
    done = ImageGeneration.wait(task)
    assert done.output.task_status == "FAILED"
    assert done.code == "DataInspectionFailed"


def test_fail_directive_on_sync_call_is_inspection_error(sim: SimServer) -> None:
    rsp = qwen("a cat [sim:fail]")
    assert (rsp.status_code, rsp.code) == (400, "DataInspectionFailed")


def test_sse_error_frame_is_read_as_an_error(sim: SimServer) -> None:
    stream = ImageGeneration.call(
        model="wan2.6-image",
        messages=[Message(role="user", content=[{"text": "steps [sim:sse-error=429]"}])],
        stream=True,
        enable_interleave=True,
        max_images=2,
    )
    events = list(stream)
    assert len(events) == 2
    assert events[0].status_code == 200
    # The SDK ignores `:HTTP_STATUS/429` and reports stream errors as 400.
    assert (events[1].status_code, events[1].code) == (400, "Throttling.RateQuota")


def test_sse_error_on_single_event_stream(sim: SimServer) -> None:
    events = list(qwen("a cat [sim:sse-error=500]", stream=True))
    assert events[0].status_code == 200
    assert events[0].output.choices[0].finish_reason == "null"
    assert events[-1].code == "InternalError"


def test_error_on_streaming_request_is_an_sse_error_response(sim: SimServer) -> None:
    events = list(qwen("a cat [sim:error=429]", stream=True))
    assert len(events) == 1
    assert (events[0].status_code, events[0].code) == (429, "Throttling.RateQuota")


def test_queued_faults(sim: SimServer) -> None:
    queued = sim.sim("POST", "/_sim/faults", json={"fault": "error=503", "count": 2})
    assert queued.status_code == 200
    assert [qwen("a").status_code for _ in range(3)] == [503, 503, 200]


def test_queued_faults_skip_polls_unless_asked(sim: SimServer) -> None:
    task = ImageSynthesis.async_call(model="wan2.2-t2i-flash", prompt="p", n=1)
    sim.sim("POST", "/_sim/faults", json={"fault": "error=500", "count": 1})
    assert ImageSynthesis.fetch(task).status_code == 200  # a poll does not consume it
    assert qwen("a").status_code == 500
    sim.sim("POST", "/_sim/faults", json={"fault": "error=500", "count": 1, "polls": True})
    assert ImageSynthesis.fetch(task).status_code == 500


def test_bad_fault_requests_are_rejected(sim: SimServer) -> None:
    assert sim.sim("POST", "/_sim/faults", json={"fault": "error=999"}).status_code == 400
    assert sim.sim("POST", "/_sim/faults", json={"fault": "explode"}).status_code == 400
    assert sim.sim("POST", "/_sim/faults", json={"fault": "slow=1", "count": 0}).status_code == 400
    assert sim.sim("GET", "/_sim/faults").json() == {"queued": []}


def test_stats_count_faults_and_images(sim: SimServer) -> None:
    qwen("a", n=3)
    qwen("a [sim:error=500]")
    stats = sim.sim("GET", "/_sim/stats").json()
    assert stats["images_generated"] == 3
    assert stats["faults_injected"] == 1
    path = "/api/v1/services/aigc/multimodal-generation/generation"
    assert stats["requests_by_path"][path] == 2
