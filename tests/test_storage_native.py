"""`storage:` on `/api/v1` with the official DashScope SDK: sync answers, task polls, SSE and
inline base64 all hand out the gateway's links, whose bytes are DashScope's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dashscope
import pytest
import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message

from tests.conftest import KEY_A, UPSTREAM_KEY, Gateway, GatewayFactory
from tests.storage_support import (
    expire_originals,
    image_fetches,
    is_link,
    name_of,
    query_of,
    storage_yaml,
    stored,
    stored_files,
)
from tests.support import Live


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def gw(start_gateway: GatewayFactory, images_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    gateway = start_gateway(extra=storage_yaml(images_dir))
    monkeypatch.setattr(dashscope, "base_http_api_url", gateway.api)
    monkeypatch.setattr(dashscope, "api_key", KEY_A)
    return gateway


def msgs(text: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"text": text}]}]


def original_png(sim: Live, seed: int, index: int) -> bytes:
    """What DashScope (the simulator) serves for image `index` of a generation with `seed`."""
    rsp = requests.post(
        sim.url + "/api/v1/services/aigc/multimodal-generation/generation",
        json={
            "model": "qwen-image-2.0-pro",
            "input": {"messages": msgs("the same")},
            "parameters": {"n": index + 1, "seed": seed, "size": "1024*1024"},
        },
        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        timeout=10,
    )
    url = rsp.json()["output"]["choices"][index]["message"]["content"][0]["image"]
    return requests.get(url, timeout=5).content


def test_sync_answer_links_hold_dashscopes_bytes(gw: Gateway, sim: Live, images_dir: Path) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-2.0-pro", messages=msgs("a red fox"), n=2, size="1024*1024", seed=42
    )
    assert rsp.status_code == 200, rsp
    urls = [c.message.content[0]["image"] for c in rsp.output.choices]
    assert all(is_link(gw, u) for u in urls), urls
    assert len({name_of(u) for u in urls}) == 2
    assert rsp.usage["image_count"] == 2 and gw.images("team-a", "qwen-image-2.0-pro") == 2
    assert stored(gw) == 2 and len(stored_files(images_dir)) == 2
    for index, url in enumerate(urls):
        got = requests.get(url, timeout=5)
        assert got.status_code == 200
        assert got.content == original_png(sim, 42, index)


def test_everything_but_the_urls_is_unchanged(gw: Gateway, sim: Live) -> None:
    body = {
        "model": "qwen-image-2.0-pro",
        "input": {"messages": msgs("a heron")},
        "parameters": {"size": "1024*1024", "seed": 7},
    }
    headers = {"Authorization": f"Bearer {KEY_A}"}
    path = "/api/v1/services/aigc/multimodal-generation/generation"
    via_gateway = requests.post(gw.url + path, json=body, headers=headers, timeout=10)
    direct = requests.post(
        sim.url + path, json=body, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=10
    )
    assert "X-DashScope-Proxy-Storage" not in via_gateway.headers
    assert int(via_gateway.headers["Content-Length"]) == len(via_gateway.content)
    ours, theirs = via_gateway.json(), direct.json()
    link = ours["output"]["choices"][0]["message"]["content"][0].pop("image")
    theirs["output"]["choices"][0]["message"]["content"][0].pop("image")
    assert is_link(gw, link)
    ours.pop("request_id"), theirs.pop("request_id")
    assert ours == theirs
    assert list(ours["output"]) == list(theirs["output"])  # same fields, same order


def test_original_expired_after_the_link_was_opened(gw: Gateway, sim: Live) -> None:
    rsp = MultiModalConversation.call(model="qwen-image-2.0", messages=msgs("a lamp"))
    url = rsp.output.choices[0].message.content[0]["image"]
    first = requests.get(url, timeout=5).content
    expire_originals(sim)
    again = requests.get(url, timeout=5)
    assert again.status_code == 200 and again.content == first


def test_original_expired_before_the_link_was_ever_opened(gw: Gateway, sim: Live) -> None:
    rsp = MultiModalConversation.call(model="qwen-image-2.0", messages=msgs("a boat"))
    url = rsp.output.choices[0].message.content[0]["image"]
    fetched = image_fetches(sim)
    expire_originals(sim)  # DashScope's URL is dead from now on
    got = requests.get(url, timeout=5)
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    assert image_fetches(sim) == fetched  # served from the store, not from DashScope


def test_task_polls_share_one_object_and_are_resigned(
    gw: Gateway, sim: Live, images_dir: Path
) -> None:
    task = ImageSynthesis.async_call(model="wan2.2-t2i-flash", prompt="a castle", n=1)
    assert task.status_code == 200, task
    done = ImageSynthesis.wait(task)
    assert done.output.task_status == "SUCCEEDED", done
    first = done.output.results[0].url
    assert is_link(gw, first)
    fetched = image_fetches(sim)
    time.sleep(1.1)  # a later second: a fresh expiry
    again = ImageSynthesis.fetch(task)
    second = again.output.results[0].url
    assert is_link(gw, second)
    assert name_of(second) == name_of(first)
    assert query_of(second)["expires"] > query_of(first)["expires"]
    assert image_fetches(sim) == fetched  # never fetched twice
    assert stored(gw) == 1 and len(stored_files(images_dir)) == 1
    assert gw.images("team-a", "wan2.2-t2i-flash") == 1  # and counted once
    assert requests.get(first, timeout=5).content == requests.get(second, timeout=5).content


def stream_images(text: str, **headers: str) -> tuple[list[Any], list[str]]:
    """An interleaved wan2.6-image stream of two images through the DashScope SDK: its
    chunks (each asserted 200) and the image URLs they carry, in order."""
    chunks = list(
        ImageGeneration.call(
            model="wan2.6-image",
            messages=[Message(role="user", content=[{"text": text}])],
            stream=True,
            enable_interleave=True,
            max_images=2,
            size="1280*1280",
            headers=headers,
        )
    )
    assert all(c.status_code == 200 for c in chunks), chunks
    images = [
        item["image"]
        for c in chunks
        for choice in c.output.choices or []
        for item in choice.message.content or []
        if isinstance(item, dict) and item.get("image")
    ]
    return chunks, images


def test_sse_events_carry_links(gw: Gateway) -> None:
    chunks, images = stream_images("a tutorial")
    assert len(images) == 2, chunks
    assert all(is_link(gw, u) for u in images), images
    assert chunks[-1].usage["image_count"] == 2
    assert gw.images("team-a", "wan2.6-image") == 2
    assert all(requests.get(u, timeout=5).content.startswith(b"\x89PNG") for u in images)


def test_inline_base64_is_stored_and_linked(gw: Gateway, sim: Live, images_dir: Path) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-2.0-pro", messages=msgs("[sim:base64] a kite"), seed=9
    )
    assert rsp.status_code == 200, rsp
    url = rsp.output.choices[0].message.content[0]["image"]
    assert is_link(gw, url), url[:80]
    assert requests.get(url, timeout=5).content == original_png(sim, 9, 0)
    assert stored(gw) == 1 and len(stored_files(images_dir)) == 1
    assert gw.images("team-a", "qwen-image-2.0-pro") == 1


def test_aliyun_front_hands_out_links(gw: Gateway) -> None:
    rsp = requests.post(
        gw.url + "/aliyun/v1/images/generations",
        json={"model": "qwen-image-2.0", "input": {"messages": msgs("a pear")}},
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=10,
    )
    assert rsp.status_code == 200, rsp.text
    url = rsp.json()["output"]["choices"][0]["message"]["content"][0]["image"]
    assert is_link(gw, url)
    assert requests.get(url, timeout=5).content.startswith(b"\x89PNG")


def test_forwarded_scheme_and_host_are_honoured(gw: Gateway) -> None:
    rsp = requests.post(
        gw.url + "/api/v1/services/aigc/multimodal-generation/generation",
        json={"model": "qwen-image-2.0", "input": {"messages": msgs("a door")}},
        headers={
            "Authorization": f"Bearer {KEY_A}",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "images.example.com",
        },
        timeout=10,
    )
    url = rsp.json()["output"]["choices"][0]["message"]["content"][0]["image"]
    assert url.startswith("https://images.example.com/images/"), url
    # The same link, on the gateway itself, works.
    local = gw.url + url.removeprefix("https://images.example.com")
    assert requests.get(local, timeout=5).status_code == 200


def test_a_large_inline_answer_is_read_whole_and_rewritten(gw: Gateway, images_dir: Path) -> None:
    # `pad` makes the answer larger than the relay's small-JSON limit (256 KiB).
    rsp = requests.post(
        gw.url + "/api/v1/services/aigc/multimodal-generation/generation",
        json={
            "model": "qwen-image-2.0",
            "input": {"messages": msgs("[sim:base64 pad=400000] a large answer")},
        },
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )
    assert rsp.status_code == 200 and len(rsp.content) > 300_000
    assert int(rsp.headers["Content-Length"]) == len(rsp.content)
    url = rsp.json()["output"]["choices"][0]["message"]["content"][0]["image"]
    assert is_link(gw, url), url[:80]
    assert requests.get(url, timeout=5).content.startswith(b"\x89PNG")
    assert len(stored_files(images_dir)) == 1
    assert gw.images("team-a", "qwen-image-2.0") == 1


def test_an_idempotent_replay_hands_out_the_stored_links(
    gw: Gateway, sim: Live, images_dir: Path
) -> None:
    path = "/api/v1/services/aigc/multimodal-generation/generation"
    body = {
        "model": "qwen-image-2.0",
        "input": {"messages": msgs("a kept answer")},
        "parameters": {"n": 2},
    }
    headers = {"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "stored-once"}
    first = requests.post(gw.url + path, json=body, headers=headers, timeout=10)
    assert first.status_code == 200, first.text
    urls = [c["message"]["content"][0]["image"] for c in first.json()["output"]["choices"]]
    assert all(is_link(gw, u) for u in urls), urls
    fetched = image_fetches(sim)
    expire_originals(sim)  # DashScope's URLs are dead; only the stored copies remain
    again = requests.post(gw.url + path, json=body, headers=headers, timeout=10)
    assert again.status_code == 200 and again.headers["Idempotency-Replayed"] == "true"
    assert again.content == first.content  # the kept answer is the one with our links
    for url in urls:
        got = requests.get(url, timeout=5)
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    assert image_fetches(sim) == fetched  # the replay stored nothing again
    assert stored(gw) == 2 and len(stored_files(images_dir)) == 2
    assert gw.images("team-a", "qwen-image-2.0") == 2  # counted once


def test_an_idempotent_stream_replay_carries_the_stored_links(gw: Gateway, sim: Live) -> None:
    def stream() -> list[str]:
        return stream_images("a kept stream", **{"Idempotency-Key": "stored-stream"})[1]

    first = stream()
    assert len(first) == 2 and all(is_link(gw, u) for u in first), first
    expire_originals(sim)
    assert stream() == first  # the kept stream is the rewritten one
    assert all(requests.get(u, timeout=5).content.startswith(b"\x89PNG") for u in first)
    assert gw.images("team-a", "wan2.6-image") == 2
