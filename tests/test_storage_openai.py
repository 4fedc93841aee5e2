"""`storage:` on `/v1` with the official OpenAI SDK: `url` answers and task objects carry the
gateway's links; `b64_json` answers stay base64 but the image is stored too, fetched once."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Gateway, GatewayFactory
from tests.openai_helpers import client, http
from tests.storage_support import (
    expire_originals,
    image_fetches,
    is_link,
    name_of,
    storage_yaml,
    stored,
    stored_files,
)
from tests.support import Live, LoopThread

ASYNC_ONLY = """
models:
  wan2.2-t2i-flash: {async_only: true}
"""


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def gw(start_gateway: GatewayFactory, images_dir: Path) -> Gateway:
    return start_gateway(extra=ASYNC_ONLY + storage_yaml(images_dir))


def test_url_answers_carry_links(gw: Gateway, sim: Live, images_dir: Path) -> None:
    result = client(gw).images.generate(
        model="qwen-image-2.0", prompt="a lighthouse", n=2, response_format="url"
    )
    urls = [d.url or "" for d in result.data]
    assert len(urls) == 2 and all(is_link(gw, u) for u in urls), urls
    assert gw.images("team-a", "qwen-image-2.0") == 2
    expire_originals(sim)
    assert all(requests.get(u, timeout=5).content.startswith(b"\x89PNG") for u in urls)
    assert stored(gw) == 2 and len(stored_files(images_dir)) == 2


def test_b64_json_stays_base64_and_is_stored_once(gw: Gateway, sim: Live, images_dir: Path) -> None:
    before = image_fetches(sim)
    result = client(gw).images.generate(
        model="qwen-image-2.0", prompt="a violin", response_format="b64_json"
    )
    data = base64.b64decode(result.data[0].b64_json or "")
    assert data.startswith(b"\x89PNG") and result.data[0].url is None
    assert image_fetches(sim) == before + 1  # one fetch: for the store, read back for b64
    files = stored_files(images_dir)
    assert len(files) == 1 and files[0].read_bytes() == data


def wait_task(lt: LoopThread, gw: Gateway, task_id: str) -> dict[str, Any]:
    for _ in range(100):
        status, body = http(lt, "GET", f"{gw.url}/v1/images/generations/{task_id}")
        assert status == 200, body
        if body["status"] not in ("QUEUED", "IN_PROGRESS"):
            return body
        time.sleep(0.05)
    raise AssertionError("the task never finished")


def test_task_objects_carry_links_and_repolls_reuse_the_object(
    gw: Gateway, sim: Live, loop_thread: LoopThread
) -> None:
    status, task = http(
        loop_thread,
        "POST",
        gw.url + "/v1/images/generations",
        json={"model": "wan2.2-t2i-flash", "prompt": "a harbour", "response_format": "url"},
    )
    assert status == 200 and task["object"] == "image.generation.task", task
    done = wait_task(loop_thread, gw, task["id"])
    assert done["status"] == "SUCCEEDED", done
    first = done["data"][0]["url"]
    assert is_link(gw, first), first
    fetched = image_fetches(sim)
    again = wait_task(loop_thread, gw, task["id"])
    assert name_of(again["data"][0]["url"]) == name_of(first)
    assert image_fetches(sim) == fetched
    assert stored(gw) == 1 and gw.images("team-a", "wan2.2-t2i-flash") == 1
    assert requests.get(first, timeout=5).content.startswith(b"\x89PNG")
