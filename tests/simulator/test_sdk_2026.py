"""The official dashscope SDK against a real simulator socket: the 2026 models and dated
snapshots of them."""

from __future__ import annotations

import pytest
import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message
from sim_helpers import SimServer

from proxy.simulator.png import PNG_SIGNATURE, draw_image

IMG = "https://example.com/in.png"


def fetch_png(url: str) -> bytes:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.content.startswith(PNG_SIGNATURE)
    return response.content


def user(text: str, images: int = 0) -> list[dict[str, object]]:
    # Images before the text item, as DashScope's qwen-image-3.0 examples write them.
    content: list[dict[str, str]] = [{"image": f"{IMG}?{i}"} for i in range(images)]
    return [{"role": "user", "content": [*content, {"text": text}]}]


def test_sdk_reads_a_qwen_image_3_answer(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-3.0",
        messages=user("put the cat on the sofa", images=2),
        n=2,
        size="1024*1024",
        seed=3,
        enable_thinking=True,
        prompt_extend_model="direct",
    )
    assert rsp.status_code == 200, rsp
    assert len(rsp.output.choices) == 2
    for index, choice in enumerate(rsp.output.choices):
        assert choice.message.role == "assistant"
        assert list(choice.message.content[0]) == ["image"]  # qwen style: no `type`
        assert fetch_png(choice.message.content[0]["image"]) == draw_image(3, index, 64)
    usage = rsp.usage
    assert "image_count" not in usage
    assert (usage["output_image_count"], usage["input_image_count"]) == (2, 2)
    assert (usage["output_width"], usage["output_height"]) == (1024, 1024)
    assert (usage["output_image_type"], usage["input_image_type"]) == ("url", "url")
    assert rsp.output["rewrite_status"] == "success"  # prompt_extend defaults to on


def test_qwen_image_3_text_to_image_defaults(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-3.0", messages=user("a lighthouse"), prompt_extend=False
    )
    assert rsp.status_code == 200, rsp
    assert len(rsp.output.choices) == 1
    assert (rsp.usage["output_width"], rsp.usage["output_height"]) == (2048, 2048)
    assert rsp.usage["input_image_count"] == 0 and "input_image_type" not in rsp.usage
    assert "rewrite_status" not in rsp.output


def test_qwen_image_3_pro_dated_snapshot(sim: SimServer) -> None:
    model = "qwen-image-3.0-pro-2026-09-01"
    rsp = MultiModalConversation.call(model=model, messages=user("six cats", images=3), n=6)
    assert rsp.status_code == 200, rsp
    assert len(rsp.output.choices) == 6 and rsp.usage["output_image_count"] == 6
    assert "image_count" not in rsp.usage
    too_many = MultiModalConversation.call(model=model, messages=user("x"), n=7)
    assert (too_many.status_code, too_many.code) == (400, "InvalidParameter")
    four = MultiModalConversation.call(model=model, messages=user("x", images=4))
    assert (four.status_code, four.code) == (400, "InvalidParameter")
    not_async = ImageSynthesis.async_call(model=model, prompt="x")
    assert (not_async.status_code, not_async.code) == (403, "AccessDenied")


def test_qwen_image_3_streams_one_final_event(sim: SimServer) -> None:
    events = list(
        MultiModalConversation.call(
            model="qwen-image-3.0-pro", messages=user("a boat"), n=2, stream=True
        )
    )
    assert len(events) == 1
    assert events[0].status_code == 200
    assert events[0].usage["output_image_count"] == 2
    assert [c.finish_reason for c in events[0].output.choices] == ["stop", "stop"]


def test_z_image_turbo(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(model="z-image-turbo", messages=user("a fox"))
    assert rsp.status_code == 200, rsp
    assert len(rsp.output.choices) == 1
    fetch_png(rsp.output.choices[0].message.content[0]["image"])
    assert (rsp.usage["image_count"], rsp.usage["width"], rsp.usage["height"]) == (1, 1024, 1536)
    assert "output_image_count" not in rsp.usage
    edit = MultiModalConversation.call(model="z-image-turbo", messages=user("x", images=1))
    assert (edit.status_code, edit.code) == (400, "InvalidParameter")


def test_qwen_image_edit_max_several_images_in_one_choice(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-edit-max", messages=user("merge", images=3), n=2
    )
    assert rsp.status_code == 200, rsp
    assert len(rsp.output.choices) == 1
    content = rsp.output.choices[0].message.content
    assert len(content) == 2 and all(list(item) == ["image"] for item in content)
    assert rsp.usage["image_count"] == 2
    none = MultiModalConversation.call(model="qwen-image-edit-max", messages=user("x"))
    assert (none.status_code, none.code) == (400, "InvalidParameter")


def test_wan27_image_text_to_image_with_passthrough_parameters(sim: SimServer) -> None:
    rsp = ImageGeneration.call(
        model="wan2.7-image",
        messages=[Message(role="user", content=[{"text": "a garden"}])],
        n=1,
        thinking_mode=True,
        enable_sequential=False,
        bbox_list=[[0, 0, 100, 100]],
    )
    assert rsp.status_code == 200, rsp
    assert rsp.output.finished is True
    item = rsp.output.choices[0].message.content[0]
    assert item["type"] == "image"
    fetch_png(item["image"])
    assert rsp.usage["image_count"] == 1 and rsp.usage["size"] == "1280*1280"
    sent = sim.sim("GET", "/_sim/requests").json()["requests"][-1]["body"]["parameters"]
    assert sent["thinking_mode"] is True and sent["bbox_list"] == [[0, 0, 100, 100]]


def test_wan27_image_pro_async_with_four_references(sim: SimServer) -> None:
    content = [{"text": "combine"}, *({"image": f"{IMG}?{i}"} for i in range(4))]
    task = ImageGeneration.async_call(
        model="wan2.7-image-pro", messages=[Message(role="user", content=content)], n=2
    )
    assert task.status_code == 200, task
    done = ImageGeneration.wait(task)
    assert done.output.task_status == "SUCCEEDED"
    assert len(done.output.choices) == 2 and done.usage["image_count"] == 2
    five = [*content, {"image": f"{IMG}?5"}]
    refused = ImageGeneration.call(
        model="wan2.7-image-pro", messages=[Message(role="user", content=five)]
    )
    assert (refused.status_code, refused.code) == (400, "InvalidParameter")


def test_wan27_interleave_streams_with_references(sim: SimServer) -> None:
    content = [{"text": "a tutorial"}, {"image": IMG}, {"image": f"{IMG}?2"}]
    events = list(
        ImageGeneration.call(
            model="wan2.7-image",
            messages=[Message(role="user", content=content)],
            stream=True,
            enable_interleave=True,
            max_images=2,
        )
    )
    assert len(events) == 5  # text, image, text, image, text
    kinds = [event.output.choices[0].message.content[0]["type"] for event in events]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert events[-1].usage["image_count"] == 2


def test_dated_snapshots_route_as_their_family(sim: SimServer) -> None:
    task = ImageGeneration.async_call(
        model="wan2.7-image-0401", messages=[Message(role="user", content=[{"text": "x"}])], n=1
    )
    assert task.status_code == 200, task
    listed = ImageSynthesis.list(model_name="wan2.7-image-0401", page_size=100)
    assert task.output.task_id in [entry["task_id"] for entry in listed.output["data"]]
    old = ImageSynthesis.call(model="qwen-image-plus-2026-01-09", prompt="a cat")
    assert old.output.task_status == "SUCCEEDED"
    edit = MultiModalConversation.call(
        model="qwen-image-edit-plus-2025-12-15", messages=user("x", images=1)
    )
    assert edit.status_code == 200 and len(edit.output.choices) == 1


@pytest.mark.parametrize("model", ["qwen-image-3.0-2026-02-30", "qwen-image-3.0-pro-0000"])
def test_invalid_snapshot_dates_are_unknown(sim: SimServer, model: str) -> None:
    rsp = MultiModalConversation.call(model=model, messages=user("x"))
    assert (rsp.status_code, rsp.code, rsp.message) == (400, "InvalidParameter", "Model not exist.")
