"""The official dashscope SDK against a real simulator socket: every happy path it takes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message
from sim_helpers import OTHER_KEY, SimServer

from proxy.simulator.png import PNG_SIGNATURE, draw_image

PROMPT = [{"role": "user", "content": [{"text": "a red fox in the snow"}]}]


def fetch_png(url: str) -> bytes:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    assert response.content.startswith(PNG_SIGNATURE)
    return response.content


def test_qwen_image_2_pro_n2_gives_two_choices(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-2.0-pro",
        messages=PROMPT,
        n=2,
        size="2048*2048",
        seed=42,
        watermark=False,
        prompt_extend=True,
        negative_prompt="blurry",
    )
    assert rsp.status_code == 200, rsp
    assert len(rsp.output.choices) == 2
    for choice in rsp.output.choices:
        assert choice.finish_reason == "stop"
        assert choice.message.role == "assistant"
        assert len(choice.message.content) == 1
        fetch_png(choice.message.content[0]["image"])
    assert rsp.usage["image_count"] == 2
    assert (rsp.usage["width"], rsp.usage["height"]) == (2048, 2048)
    assert rsp.headers["x-dashscope-call-gateway"] == "true"
    assert rsp.headers["x-request-id"] == rsp.request_id
    assert "req-cost-time" in rsp.headers


def test_same_seed_same_image(sim: SimServer) -> None:
    urls = []
    for _ in range(2):
        rsp = MultiModalConversation.call(model="qwen-image-2.0", messages=PROMPT, seed=7)
        urls.append(rsp.output.choices[0].message.content[0]["image"])
    assert urls[0] != urls[1]  # every result has its own URL ...
    assert fetch_png(urls[0]) == fetch_png(urls[1])  # ... of the same deterministic image


def test_wan26_image_interleave_streams_event_by_event(sim: SimServer) -> None:
    stream = ImageGeneration.call(
        model="wan2.6-image",
        messages=[Message(role="user", content=[{"text": "a three-step pancake tutorial"}])],
        stream=True,
        enable_interleave=True,
        max_images=3,
        size="1280*1280",
    )
    events = list(stream)
    assert len(events) == 7  # text, image, text, image, text, image, text
    assert all(event.status_code == 200 for event in events)
    items = [event.output.choices[0].message.content[0] for event in events]
    assert [item["type"] for item in items] == ["text", "image"] * 3 + ["text"]
    for item in items[1::2]:
        fetch_png(item["image"])
    reasons = [event.output.choices[0].finish_reason for event in events]
    assert reasons == ["null"] * 6 + ["stop"]
    assert events[-1].usage["image_count"] == 3
    assert all("image_count" not in event.usage for event in events[:-1])


def test_wan26_t2i_sync(sim: SimServer) -> None:
    rsp = ImageGeneration.call(
        model="wan2.6-t2i",
        messages=[Message(role="user", content=[{"text": "A flower shop"}])],
        n=1,
        size="1280*1280",
        prompt_extend=True,
        watermark=False,
    )
    assert rsp.status_code == 200, rsp
    assert rsp.output.finished is True
    content = rsp.output.choices[0].message.content
    assert content[0]["type"] == "image"
    fetch_png(content[0]["image"])
    assert rsp.usage["image_count"] == 1
    assert rsp.usage["size"] == "1280*1280"
    assert rsp.usage["total_tokens"] == 0


def test_wan26_t2i_default_n_is_4(sim: SimServer) -> None:
    rsp = ImageGeneration.call(model="wan2.6-t2i", messages=PROMPT)
    assert rsp.usage["image_count"] == 4
    assert len(rsp.output.choices) == 4


def test_image_generation_async_call_and_wait(sim: SimServer) -> None:
    submitted = ImageGeneration.async_call(
        model="wan2.6-t2i", messages=PROMPT, n=2, size="1280*1280"
    )
    assert submitted.status_code == 200, submitted
    assert submitted.output.task_status == "PENDING"
    done = ImageGeneration.wait(submitted)
    assert done.status_code == 200
    assert done.output.task_status == "SUCCEEDED"
    assert done.output.finished is True
    assert len(done.output.choices) == 2
    assert done.usage["image_count"] == 2
    for choice in done.output.choices:
        fetch_png(choice.message.content[0]["image"])


def test_image_synthesis_qwen_image_plus(sim: SimServer) -> None:
    rsp = ImageSynthesis.call(
        model="qwen-image-plus", prompt="a cat", negative_prompt="ugly", size="1328*1328", seed=7
    )
    assert rsp.status_code == 200, rsp
    assert rsp.output.task_status == "SUCCEEDED"
    assert len(rsp.output.results) == 1
    result = rsp.output.results[0]
    assert result.orig_prompt == "a cat"
    assert result.actual_prompt.startswith("a cat")
    assert fetch_png(result.url) == draw_image(7, 0, 64)
    assert rsp.usage.image_count == 1
    assert rsp.output.task_metrics["SUCCEEDED"] == 1


def test_image_synthesis_wan22_flash_default_n(sim: SimServer) -> None:
    rsp = ImageSynthesis.call(model="wan2.2-t2i-flash", prompt="a lighthouse")
    assert rsp.output.task_status == "SUCCEEDED"
    assert len(rsp.output.results) == 4
    for result in rsp.output.results:
        fetch_png(result.url)
    assert rsp.usage.image_count == 4


def test_sync_call_answers_the_final_task(sim: SimServer) -> None:
    rsp = ImageSynthesis.sync_call(model="wan2.2-t2i-plus", prompt="a tree", n=1)
    assert rsp.status_code == 200, rsp
    assert rsp.output.task_status == "SUCCEEDED"
    fetch_png(rsp.output.results[0].url)
    again = ImageSynthesis.fetch(rsp.output.task_id)
    assert again.output.task_status == "SUCCEEDED"


def test_sync_call_on_async_only_model_is_denied(sim: SimServer) -> None:
    rsp = ImageSynthesis.sync_call(model="qwen-image-plus", prompt="a tree")
    assert (rsp.status_code, rsp.code) == (403, "AccessDenied")


def test_expired_and_forged_urls_are_403(sim: SimServer, expiring_server: SimServer) -> None:
    body = {"model": "wan2.2-t2i-flash", "input": {"prompt": "x"}, "parameters": {"n": 1}}
    answer = requests.post(
        f"{expiring_server.base_url}/services/aigc/text2image/image-synthesis",
        json=body,
        headers={"Authorization": f"Bearer {expiring_server.key}"},
        timeout=10,
    ).json()
    expired = answer["output"]["results"][0]["url"]
    assert requests.get(expired, timeout=10).status_code == 403

    fresh = MultiModalConversation.call(model="qwen-image-2.0", messages=PROMPT)
    url = fresh.output.choices[0].message.content[0]["image"]
    assert requests.get(url, timeout=10).status_code == 200
    longer = url.replace("Expires=", "Expires=9")
    assert requests.get(longer, timeout=10).status_code == 403
    unsigned = url.split("&Signature=")[0]
    assert requests.get(unsigned, timeout=10).status_code == 403


def test_cancel_while_pending_then_not_after_success(sim: SimServer) -> None:
    pending = ImageSynthesis.async_call(model="wanx2.1-t2i-turbo", prompt="a boat", n=1)
    assert pending.output.task_status == "PENDING"
    cancelled = ImageSynthesis.cancel(pending)
    assert cancelled.status_code == 200, cancelled
    assert ImageSynthesis.fetch(pending).output.task_status == "CANCELED"

    finished = ImageSynthesis.call(model="wanx2.1-t2i-turbo", prompt="a boat", n=1)
    assert finished.output.task_status == "SUCCEEDED"
    refused = ImageSynthesis.cancel(finished.output.task_id)
    assert refused.status_code == 400
    assert refused.code == "UnsupportedOperation"
    assert "PENDING" in refused.message


def test_poll_sees_pending_running_succeeded(sim: SimServer) -> None:
    task = ImageSynthesis.async_call(model="wanx-v1", prompt="a house", n=1, style="<anime>")
    seen = [ImageSynthesis.fetch(task).output.task_status]
    time.sleep(0.45)
    seen.append(ImageSynthesis.fetch(task).output.task_status)
    time.sleep(0.3)
    seen.append(ImageSynthesis.fetch(task).output.task_status)
    assert seen == ["PENDING", "RUNNING", "SUCCEEDED"]


def test_list_tasks_with_filters(sim: SimServer) -> None:
    first = ImageSynthesis.async_call(model="wan2.5-t2i-preview", prompt="p", n=1)
    second = ImageSynthesis.async_call(model="wanx2.1-t2i-plus", prompt="p", n=1)
    listed = ImageSynthesis.list(page_size=100)
    assert listed.status_code == 200, listed
    ids = [entry["task_id"] for entry in listed.output["data"]]
    assert first.output.task_id in ids and second.output.task_id in ids
    assert listed.output["tasks"] == listed.output["data"]
    assert listed.output["page_no"] == 1

    only = ImageSynthesis.list(model_name="wan2.5-t2i-preview", page_size=100)
    assert {e["model_name"] for e in only.output["data"]} == {"wan2.5-t2i-preview"}
    pending = ImageSynthesis.list(status="PENDING", page_size=100)
    assert all(e["status"] == "PENDING" for e in pending.output["data"])


def test_unknown_and_foreign_task_ids_are_unknown(sim: SimServer) -> None:
    assert ImageSynthesis.fetch("no-such-task").output.task_status == "UNKNOWN"
    mine = ImageSynthesis.async_call(model="wan2.2-t2i-flash", prompt="p", n=1)
    theirs = ImageSynthesis.fetch(mine.output.task_id, api_key=OTHER_KEY)
    assert theirs.status_code == 200
    assert theirs.output.task_status == "UNKNOWN"
    listed = ImageSynthesis.list(api_key=OTHER_KEY, page_size=100)
    assert mine.output.task_id not in [e["task_id"] for e in listed.output["data"]]


def test_wrong_key_is_401(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(model="qwen-image-2.0", messages=PROMPT, api_key="sk-bad")
    assert (rsp.status_code, rsp.code) == (401, "InvalidApiKey")
    assert rsp.message == "Invalid API-key provided."
    submit = ImageSynthesis.async_call(model="qwen-image-plus", prompt="p", api_key="sk-bad")
    assert (submit.status_code, submit.code) == (401, "InvalidApiKey")
    assert ImageSynthesis.fetch("x", api_key="sk-bad").status_code == 401


@pytest.mark.parametrize(
    ("model", "kwargs", "code"),
    [
        ("qwen-image-plus", {"size": "1024*1024"}, "InvalidParameter"),
        ("qwen-image-2.0", {"size": "1024x1024"}, "InvalidParameter"),
        ("qwen-image-2.0", {"size": "4096*4096"}, "InvalidParameter"),
        ("qwen-image-max", {"n": 2}, "InvalidParameter"),
        ("qwen-image-2.0-pro", {"n": 7}, "InvalidParameter"),
        ("qwen-image-2.0", {"seed": -1}, "InvalidParameter"),
        ("qwen-image-9000", {}, "InvalidParameter"),
    ],
)
def test_invalid_requests(sim: SimServer, model: str, kwargs: dict[str, object], code: str) -> None:
    rsp = MultiModalConversation.call(model=model, messages=PROMPT, **kwargs)
    assert (rsp.status_code, rsp.code) == (400, code), rsp
    if model == "qwen-image-9000":
        assert rsp.message == "Model not exist."


def test_async_on_sync_only_model_is_403(sim: SimServer) -> None:
    rsp = ImageSynthesis.async_call(model="qwen-image-2.0-pro", prompt="p")
    assert (rsp.status_code, rsp.code) == (403, "AccessDenied")
    assert rsp.message == "current user api does not support asynchronous calls"


def test_wan22_invalid_size_and_n(sim: SimServer) -> None:
    too_big = ImageSynthesis.async_call(model="wan2.2-t2i-flash", prompt="p", size="2048*2048")
    assert (too_big.status_code, too_big.code) == (400, "InvalidParameter")
    too_many = ImageSynthesis.async_call(model="wan2.2-t2i-flash", prompt="p", n=5)
    assert (too_many.status_code, too_many.code) == (400, "InvalidParameter")


def test_local_file_upload_resolves_to_oss(sim: SimServer, tmp_path: Path) -> None:
    picture = tmp_path / "input.png"
    picture.write_bytes(draw_image(1, 0, 16))
    rsp = ImageGeneration.call(
        model="wan2.6-image",
        messages=[
            Message(role="user", content=[{"text": "make it blue"}, {"image": str(picture)}])
        ],
        n=1,
    )
    assert rsp.status_code == 200, rsp
    assert rsp.usage["image_count"] == 1
    records = sim.sim("GET", "/_sim/requests").json()["requests"]
    policy = [r for r in records if r["path"].endswith("/uploads")]
    assert policy and policy[0]["query"] == {"action": "getPolicy", "model": "wan2.6-image"}
    call = [r for r in records if r["path"].endswith("/generation")][-1]
    image = call["body"]["input"]["messages"][0]["content"][1]["image"]
    assert image.startswith("oss://dashscope-instant/") and image.endswith("/input.png")
    assert call["headers"]["X-DashScope-OssResourceResolve"] == "enable"
    assert sim.sim("GET", "/_sim/stats").json()["uploads"] == 1


def test_unresolvable_oss_reference_is_rejected(sim: SimServer) -> None:
    rsp = ImageGeneration.call(
        model="wan2.6-image",
        messages=[Message(role="user", content=[{"text": "x"}, {"image": "oss://nowhere/a.png"}])],
    )
    assert (rsp.status_code, rsp.code) == (400, "InvalidURL")
