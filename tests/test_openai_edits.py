"""POST /v1/images/edits exactly as the OpenAI SDK sends it (multipart), and GET /v1/models."""

from __future__ import annotations

import base64
import io

from tests.conftest import KEY_B, Gateway, GatewayFactory
from tests.openai_helpers import client, content_of, data_url, http, png, sim_generations
from tests.support import Live, LoopThread


def test_edit_with_repeated_image_parts(gateway: Gateway, sim: Live) -> None:
    first, second = png(shade=10), png(shade=200)
    rsp = client(gateway).images.edit(
        model="qwen-image-edit-plus",
        prompt="merge them",
        n=2,
        response_format="url",
        image=[("a.png", io.BytesIO(first), "image/png"), ("b.png", second, "image/png")],
        extra_body={"seed": 5, "watermark": False, "negative_prompt": "dark"},
    )
    assert rsp.data is not None and len(rsp.data) == 2
    [seen] = sim_generations(sim)
    assert seen["path"] == "/api/v1/services/aigc/multimodal-generation/generation"
    assert content_of(seen) == [
        {"text": "merge them"},
        {"image": data_url(first)},
        {"image": data_url(second)},
    ]
    # Form fields arrive as strings; DashScope gets integers and booleans.
    assert seen["body"]["parameters"] == {
        "n": 2,
        "seed": 5,
        "watermark": False,
        "negative_prompt": "dark",
    }
    assert gateway.images("team-a", "qwen-image-edit-plus") == 2


def test_edit_single_image_part_b64(gateway: Gateway, sim: Live) -> None:
    image = png()
    rsp = client(gateway, KEY_B).images.edit(
        model="wan2.6-image",
        prompt="make it night",
        image=("in.png", image, "image/png"),
        size="1K",
    )
    assert rsp.data is not None and len(rsp.data) == 1
    assert base64.b64decode(rsp.data[0].b64_json or "").startswith(b"\x89PNG")
    [seen] = sim_generations(sim)
    assert content_of(seen)[1] == {"image": data_url(image)}
    assert seen["body"]["parameters"] == {"n": 1, "size": "1K"}
    assert gateway.images("team-b", "wan2.6-image") == 1


def test_edit_without_model_uses_the_default_edit_model(gateway: Gateway, sim: Live) -> None:
    rsp = client(gateway).images.edit(
        image=("in.png", png(), "image/png"), prompt="sharper", response_format="url"
    )
    assert rsp.data is not None and len(rsp.data) == 1
    assert sim_generations(sim)[0]["body"]["model"] == "qwen-image-edit-plus"


def test_models_lists_what_the_key_may_use(
    start_gateway: GatewayFactory, loop_thread: LoopThread
) -> None:
    gw = start_gateway("models:\n  gpt-image-1: {target: qwen-image-2.0-pro}\n")
    models = client(gw).models.list()
    ids = [m.id for m in models.data]
    assert {"qwen-image-2.0-pro", "wan2.6-t2i", "wanx-v1", "gpt-image-1"} <= set(ids)
    alias = next(m for m in models.data if m.id == "gpt-image-1")
    assert alias.owned_by == "dashscope-proxy" and alias.model_extra == {
        "target": "qwen-image-2.0-pro"
    }
    status, body = http(loop_thread, "GET", gw.url + "/v1/models", KEY_B)
    assert status == 200 and body["object"] == "list"
    ids_b = {m["id"] for m in body["data"]}
    assert ids_b and all(i.startswith(("qwen-image", "wan2.6-")) for i in ids_b)
    assert {"qwen-image-2.0", "wan2.6-image"} <= ids_b
    assert http(loop_thread, "GET", gw.url + "/v1/models", "bad-key-123")[0] == 401
