"""Answer-reshaping directives (`base64`, `textitem`, `nocount`), the new throttling errors and
the image-URL switches (`/_sim/expire-images`, a short TTL, `public_base_url`), end to end."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import dashscope
import pytest
import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message
from sim_helpers import SimServer, run_simulator

from proxy.simulator import SimSettings
from proxy.simulator.__main__ import parse_args
from proxy.simulator.png import draw_image
from proxy.simulator.results import TEXT_IN_PLACE

E1 = "/services/aigc/multimodal-generation/generation"
DATA_PREFIX = "data:image/png;base64,"


def e1(
    sim: SimServer,
    model: str,
    prompt: str,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    body = {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
        "parameters": params or {},
    }
    return requests.post(
        f"{sim.base_url}{E1}",
        json=body,
        headers={"Authorization": f"Bearer {sim.key}", **(headers or {})},
        timeout=10,
    )


def poll(sim: SimServer, task_id: str) -> dict[str, Any]:
    """Poll a task until it is terminal; the raw body (the SDK fills in missing usage keys)."""
    for _ in range(100):
        body: dict[str, Any] = requests.get(
            f"{sim.base_url}/tasks/{task_id}",
            headers={"Authorization": f"Bearer {sim.key}"},
            timeout=10,
        ).json()
        if body["output"]["task_status"] not in ("PENDING", "RUNNING"):
            return body
        time.sleep(0.1)
    raise AssertionError("task did not finish")


def items(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for c in answer["output"]["choices"] for item in c["message"]["content"]]


def images_generated(sim: SimServer) -> int:
    return int(sim.sim("GET", "/_sim/stats").json()["images_generated"])


@pytest.mark.parametrize("source", ["prompt", "header", "queue"])
def test_base64_directive_inlines_the_same_png(sim: SimServer, source: str) -> None:
    prompt, headers = "a cat", {}
    if source == "prompt":
        prompt = "a cat [sim:base64]"
    elif source == "header":
        headers = {"X-Sim-Fault": "base64"}
    else:
        assert sim.sim("POST", "/_sim/faults", json={"fault": "base64"}).status_code == 200
    answer = e1(sim, "qwen-image-3.0", prompt, {"n": 2, "seed": 11}, headers).json()
    refs = [item["image"] for item in items(answer)]
    assert len(refs) == 2 and all(ref.startswith(DATA_PREFIX) for ref in refs)
    for index, ref in enumerate(refs):
        assert base64.b64decode(ref[len(DATA_PREFIX) :]) == draw_image(11, index, 64)
    assert answer["usage"]["output_image_type"] == "base64"
    assert answer["usage"]["output_image_count"] == 2


def test_base64_on_other_families_and_e2_tasks(sim: SimServer) -> None:
    qwen = e1(sim, "qwen-image-2.0", "x [sim:base64]").json()
    assert items(qwen)[0]["image"].startswith(DATA_PREFIX)
    assert qwen["usage"]["image_count"] == 1
    task = ImageGeneration.async_call(
        model="wan2.6-t2i", messages=[Message(role="user", content=[{"text": "x [sim:base64]"}])]
    )
    done = poll(sim, task.output.task_id)
    assert all(item["image"].startswith(DATA_PREFIX) for item in items(done))
    # E3 answers `results[].url`: a URL field, so it stays a URL.
    synthesis = ImageSynthesis.call(model="wan2.2-t2i-flash", prompt="x [sim:base64]", n=1)
    assert synthesis.output.results[0].url.startswith("http://127.0.0.1:")


def test_textitem_replaces_the_last_image(sim: SimServer) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-3.0",
        messages=[{"role": "user", "content": [{"text": "two cats [sim:textitem]"}]}],
        n=2,
    )
    assert rsp.status_code == 200, rsp
    contents = [choice.message.content for choice in rsp.output.choices]
    assert "image" in contents[0][0]
    assert contents[1] == [{"text": TEXT_IN_PLACE}]
    assert rsp.usage["output_image_count"] == 1
    assert images_generated(sim) == 1


def test_textitem_on_qwen_and_wan_models(sim: SimServer) -> None:
    qwen = e1(sim, "qwen-image-2.0", "x", {"n": 3}, {"X-Sim-Fault": "textitem"}).json()
    assert [("image" in item) for item in items(qwen)] == [True, True, False]
    assert qwen["usage"]["image_count"] == 2
    wan = e1(sim, "wan2.6-t2i", "x [sim:textitem]", {"n": 1}).json()
    assert items(wan) == [{"type": "text", "text": TEXT_IN_PLACE}]
    assert wan["usage"]["image_count"] == 0
    assert images_generated(sim) == 2


def test_textitem_in_an_interleaved_stream(sim: SimServer) -> None:
    events = list(
        ImageGeneration.call(
            model="wan2.6-image",
            messages=[Message(role="user", content=[{"text": "steps [sim:textitem]"}])],
            stream=True,
            enable_interleave=True,
            max_images=2,
        )
    )
    kinds = [event.output.choices[0].message.content[0]["type"] for event in events]
    assert kinds == ["text", "image", "text", "text", "text"]
    assert events[-1].usage["image_count"] == 1
    assert images_generated(sim) == 1


def test_textitem_on_a_task_counts_real_images_once(sim: SimServer) -> None:
    task = ImageGeneration.async_call(
        model="wan2.6-t2i",
        messages=[Message(role="user", content=[{"text": "x [sim:textitem]"}])],
        n=3,
    )
    done = poll(sim, task.output.task_id)
    assert done["usage"]["image_count"] == 2
    poll(sim, task.output.task_id)
    assert images_generated(sim) == 2


def test_nocount_on_sync_and_stream(sim: SimServer) -> None:
    qwen3 = e1(sim, "qwen-image-3.0", "x [sim:nocount]").json()
    assert "output_image_count" not in qwen3["usage"] and "image_count" not in qwen3["usage"]
    assert qwen3["usage"]["output_width"] == 2048 and len(items(qwen3)) == 1
    qwen = e1(sim, "qwen-image-2.0", "x [sim:nocount]", {"n": 2}).json()
    assert qwen["usage"] == {"width": 2048, "height": 2048} and len(items(qwen)) == 2
    stream = e1(sim, "qwen-image-2.0", "x", {"stream": True}, {"X-Sim-Fault": "nocount"})
    frame = stream.content.decode().strip().split("\n")[-1]
    final = json.loads(frame.removeprefix("data:"))
    assert "image_count" not in final["usage"] and len(items(final)) == 1


def test_nocount_on_task_polls(sim: SimServer) -> None:
    wan = ImageGeneration.async_call(
        model="wan2.6-t2i", messages=[Message(role="user", content=[{"text": "x [sim:nocount]"}])]
    )
    done = poll(sim, wan.output.task_id)
    assert done["output"]["task_status"] == "SUCCEEDED"
    assert "image_count" not in done["usage"] and len(items(done)) == 4
    synthesis = ImageSynthesis.async_call(model="wanx-v1", prompt="x [sim:nocount]", n=2)
    finished = poll(sim, synthesis.output.task_id)
    assert finished["usage"] == {} and len(finished["output"]["results"]) == 2


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("burst", "Throttling.BurstRate", "Request rate increased too quickly, please slow down."),
        ("throttling", "Throttling", "Requests throttling triggered."),
    ],
)
def test_throttling_error_kinds(sim: SimServer, kind: str, code: str, message: str) -> None:
    response = e1(sim, "qwen-image-3.0", f"x [sim:error={kind}]")
    assert response.status_code == 429
    assert (response.json()["code"], response.json()["message"]) == (code, message)
    messages = [{"role": "user", "content": [{"text": f"x [sim:sse-error={kind}]"}]}]
    events = list(
        MultiModalConversation.call(model="qwen-image-2.0", messages=messages, stream=True)
    )
    assert events[0].status_code == 200
    assert events[-1].code == code  # the 1.x SDK reports stream errors as 400


@pytest.fixture
def private_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimServer]:
    """A simulator of this test's own (expiring URLs must not disturb the shared one)."""
    with run_simulator(SimSettings(pending_seconds=0, running_seconds=0)) as server:
        monkeypatch.setattr(dashscope, "base_http_api_url", server.base_url)
        monkeypatch.setattr(dashscope, "api_key", server.key)
        yield server


def test_expire_images_expires_only_urls_handed_out_before(private_sim: SimServer) -> None:
    messages = [{"role": "user", "content": [{"text": "x"}]}]
    old = MultiModalConversation.call(model="qwen-image-2.0", messages=messages)
    old_url = old.output.choices[0].message.content[0]["image"]
    task = ImageSynthesis.call(model="wanx-v1", prompt="x", n=1)
    old_task_url = task.output.results[0].url
    assert requests.get(old_url, timeout=10).status_code == 200

    assert private_sim.sim("POST", "/_sim/expire-images").json() == {"expired": True}
    for url in (old_url, old_task_url):
        expired = requests.get(url, timeout=10)
        assert expired.status_code == 403 and "Request has expired." in expired.text

    new = MultiModalConversation.call(model="qwen-image-2.0", messages=messages)
    assert requests.get(new.output.choices[0].message.content[0]["image"], timeout=10).ok
    again = ImageSynthesis.fetch(task.output.task_id).output.results[0].url
    assert again != old_task_url and requests.get(again, timeout=10).ok
    private_sim.sim("POST", "/_sim/reset")
    assert requests.get(old_url, timeout=10).status_code == 403  # reset does not revive them


def test_short_url_ttl_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = SimSettings(pending_seconds=0, running_seconds=0, url_ttl_seconds=2)
    with run_simulator(settings) as server:
        monkeypatch.setattr(dashscope, "base_http_api_url", server.base_url)
        monkeypatch.setattr(dashscope, "api_key", server.key)
        messages = [{"role": "user", "content": [{"text": "x"}]}]
        rsp = MultiModalConversation.call(model="qwen-image-3.0", messages=messages)
        url = rsp.output.choices[0].message.content[0]["image"]
        expires = int(url.split("Expires=")[1].split("&")[0])
        assert 0 < expires - time.time() <= 2
        assert requests.get(url, timeout=10).status_code == 200
        time.sleep(max(expires - time.time(), 0) + 0.2)
        expired = requests.get(url, timeout=10)
        assert expired.status_code == 403 and "Request has expired." in expired.text


def test_public_base_url_is_the_image_url_base() -> None:
    public = "http://sim.example.test:18089"
    with run_simulator(SimSettings(public_base_url=public + "/")) as server:
        answer = e1(server, "qwen-image-2.0", "x").json()
        url = items(answer)[0]["image"]
        assert url.startswith(f"{public}/_sim/images/")
        # The signature covers the image, not the host: the same path works on the real socket.
        assert requests.get(server.root + url.removeprefix(public), timeout=10).ok
        policy = requests.get(
            f"{server.base_url}/uploads",
            params={"action": "getPolicy", "model": "wan2.6-image"},
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=10,
        ).json()["data"]
        assert policy["upload_host"] == f"{server.root}/_sim/oss"  # uploads: the caller's Host


def test_public_url_flag() -> None:
    assert parse_args([])[2].public_base_url is None
    settings = parse_args(["--public-url", "http://localhost:8089/"])[2]
    assert settings.public_base_url == "http://localhost:8089"
    with pytest.raises(SystemExit):
        parse_args(["--public-url", "localhost:8089"])
