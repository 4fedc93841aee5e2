"""POST /v1/images/generations through the official OpenAI SDK, against gateway + simulator."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import KEY_A, UPSTREAM_KEY, Gateway, GatewayFactory
from tests.openai_helpers import (
    client,
    content_of,
    data_url,
    fetch,
    header,
    http,
    png,
    sim_generations,
    sim_requests,
)
from tests.support import Live, LoopThread


def test_url_format_with_dashscope_extras(gateway: Gateway, sim: Live) -> None:
    rsp = client(gateway).images.generate(
        model="qwen-image-2.0",
        prompt="a red fox",
        size="1024x1024",
        response_format="url",
        quality="auto",
        style="vivid",
        user="end-user-7",
        extra_body={
            "negative_prompt": "blurry",
            "prompt_extend": False,
            "seed": "42",
            "watermark": True,
        },
    )
    assert isinstance(rsp.created, int)
    assert rsp.data is not None and len(rsp.data) == 1
    assert fetch(rsp.data[0].url or "").startswith(b"\x89PNG")
    assert rsp.usage is not None and rsp.model_extra is not None
    assert rsp.usage.model_extra == {"generated_images": 1}
    [seen] = sim_generations(sim)
    assert seen["path"] == "/api/v1/services/aigc/multimodal-generation/generation"
    assert seen["body"] == {
        "model": "qwen-image-2.0",
        "input": {"messages": [{"role": "user", "content": [{"text": "a red fox"}]}]},
        "parameters": {
            "n": 1,
            "size": "1024*1024",
            "seed": 42,
            "prompt_extend": False,
            "watermark": True,
            "negative_prompt": "blurry",
        },
    }
    assert header(seen, "Authorization") == f"Bearer {UPSTREAM_KEY}"
    assert header(seen, "X-DashScope-Async") is None
    assert KEY_A not in str(seen)
    assert gateway.images("team-a", "qwen-image-2.0") == 1
    assert (
        gateway.metric(
            "dashscope_proxy_requests_total",
            route="openai.generations",
            key="team-a",
            model="qwen-image-2.0",
            code="200",
        )
        == 1
    )


def test_b64_default_n2_bytes_equal_simulator_pngs(gateway: Gateway, sim: Live) -> None:
    c = client(gateway)
    # No response_format: the configured default (b64_json, as the hosted platform does).
    b64 = c.images.generate(
        model="qwen-image-2.0-pro", prompt="two cats", n=2, extra_body={"seed": 7}
    )
    urls = c.images.generate(
        model="qwen-image-2.0-pro",
        prompt="two cats",
        n=2,
        response_format="url",
        extra_body={"seed": 7},
    )
    assert b64.data is not None and urls.data is not None
    assert len(b64.data) == 2 and len(urls.data) == 2
    assert all(d.url is None for d in b64.data)
    # The simulator draws an image from (seed, index): the same seed gives the same PNGs.
    for embedded, linked in zip(b64.data, urls.data, strict=True):
        assert base64.b64decode(embedded.b64_json or "") == fetch(linked.url or "")
    assert [s["body"]["parameters"]["n"] for s in sim_generations(sim)] == [2, 2]
    assert gateway.images("team-a", "qwen-image-2.0-pro") == 4


def test_every_image_of_every_choice_and_default_n_is_one(gateway: Gateway, sim: Live) -> None:
    c = client(gateway)
    rsp = c.images.generate(
        model="wan2.6-t2i",
        prompt="a lighthouse",
        n=3,
        size="1280x1280",
        response_format="url",
        extra_body={"prompt_upsampling": True},
    )
    assert rsp.data is not None and len({d.url for d in rsp.data}) == 3
    one = c.images.generate(model="wan2.6-t2i", prompt="a lighthouse", response_format="url")
    assert one.data is not None and len(one.data) == 1
    first, second = sim_generations(sim)
    assert first["body"]["parameters"] == {"n": 3, "size": "1280*1280", "prompt_extend": True}
    # DashScope's own default for wan2.6 is 4 (billed per image); OpenAI's is 1.
    assert second["body"]["parameters"] == {"n": 1}
    assert gateway.images("team-a", "wan2.6-t2i") == 4


def test_task_models_are_submitted_and_polled_by_the_gateway(
    gateway: Gateway, sim: Live, loop_thread: LoopThread
) -> None:
    rsp = client(gateway).images.generate(
        model="wan2.2-t2i-flash", prompt="a pagoda", n=2, size="1024x1024", response_format="url"
    )
    assert rsp.data is not None and len(rsp.data) == 2
    # text2image results carry the rewritten prompt: revised_prompt.
    assert all(d.revised_prompt for d in rsp.data)
    records = sim_requests(sim)
    submit = next(r for r in records if "/services/" in r["path"])
    assert submit["path"] == "/api/v1/services/aigc/text2image/image-synthesis"
    assert header(submit, "X-DashScope-Async") == "enable"
    assert submit["body"]["input"] == {"prompt": "a pagoda"}
    polls = [r for r in records if r["path"].startswith("/api/v1/tasks/")]
    assert polls, "the gateway polled the task"
    assert gateway.images("team-a", "wan2.2-t2i-flash") == 2
    # The task is the key's: a native poll of it later does not count it again.
    task_id = polls[-1]["path"].rsplit("/", 1)[1]
    status, body = http(loop_thread, "GET", f"{gateway.api}/tasks/{task_id}")
    assert status == 200 and body["output"]["task_status"] == "SUCCEEDED"
    assert gateway.images("team-a", "wan2.2-t2i-flash") == 2


def test_mode_override_and_alias(start_gateway: GatewayFactory, sim: Live) -> None:
    gw = start_gateway("""
models:
  gpt-image-1: {target: qwen-image-2.0-pro}
  qwen-image-plus: {mode: async}
""")
    c = client(gw)
    rsp = c.images.generate(
        model="gpt-image-1", prompt="a bridge", size="1024x1024", response_format="url"
    )
    assert rsp.data is not None and len(rsp.data) == 1
    rsp = c.images.generate(
        model="qwen-image-plus", prompt="a bridge", size="1328x1328", response_format="url"
    )
    assert rsp.data is not None and len(rsp.data) == 1
    alias, plus = sim_generations(sim)
    assert alias["body"]["model"] == "qwen-image-2.0-pro"
    assert alias["path"].endswith("/multimodal-generation/generation")
    assert plus["path"].endswith("/text2image/image-synthesis")
    assert header(plus, "X-DashScope-Async") == "enable"
    # Counted under the name the client asked for.
    assert gw.images("team-a", "gpt-image-1") == 1
    assert gw.images("team-a", "qwen-image-2.0-pro") == 0
    assert gw.images("team-a", "qwen-image-plus") == 1


def test_edit_mode_through_the_image_field(gateway: Gateway, sim: Live) -> None:
    raw = png()
    rsp = client(gateway).images.generate(
        model="wan2.6-image",
        prompt="make it blue",
        n=1,
        response_format="url",
        extra_body={
            "image": [
                base64.b64encode(raw).decode(),
                data_url(raw, "image/png"),
                "https://example.com/in.png",
            ]
        },
    )
    assert rsp.data is not None and len(rsp.data) == 1
    [seen] = sim_generations(sim)
    assert content_of(seen) == [
        {"text": "make it blue"},
        {"image": data_url(raw)},
        {"image": data_url(raw)},
        {"image": "https://example.com/in.png"},
    ]
    assert gateway.images("team-a", "wan2.6-image") == 1


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_key_b_within_its_allowlist(gateway: Gateway, response_format: str) -> None:
    from tests.conftest import KEY_B

    rsp = client(gateway, KEY_B).images.generate(
        model="qwen-image-max", prompt="a kite", response_format=response_format
    )  # type: ignore[arg-type]
    assert rsp.data is not None and len(rsp.data) == 1
    assert gateway.images("team-b", "qwen-image-max") == 1
    assert gateway.images("team-a", "qwen-image-max") == 0


def test_a_snapshot_name_is_labelled_by_name_once_dashscope_accepts_it(gateway: Gateway) -> None:
    model = "qwen-image-2.0-pro-2026-03-03"  # not in the gateway's list of known names
    rsp = client(gateway).images.generate(model=model, prompt="a dune", response_format="url")
    assert rsp.data is not None and len(rsp.data) == 1
    assert gateway.images("team-a", model) == 1
    assert gateway.images("team-a", "other") == 0
