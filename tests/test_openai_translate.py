"""Table tests of the pure pieces: translation, the routing table, the fetch policy; and the
image fetcher against a small real server (redirects, size cap, timeout)."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.catalogue import Endpoint, lookup, resolve
from proxy.config import ConfigError, ImageFetchConfig, ModelOverride, UpstreamConfig, parse_config
from proxy.errors import GatewayError
from proxy.fronts.aliyun import native_body
from proxy.fronts.openai.errors import status_for_code, upstream_error
from proxy.fronts.openai.translate import (
    ImageRequest,
    dashscope_body,
    dashscope_size,
    images_of,
    parse_request,
)
from proxy.jsonutil import base64_string, dumps, loads
from proxy.upstream.fetch import FetchPolicy, fetch_all
from tests.openai_helpers import png
from tests.support import LoopThread


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1024x1024", "1024*1024"),
        ("1328x1328", "1328*1328"),
        ("2048*2048", "2048*2048"),
        ("1k", "1K"),
        ("auto", None),
        (None, None),
    ],
)
def test_sizes(size: str | None, expected: str | None) -> None:
    assert dashscope_size(size) == expected


@pytest.mark.parametrize("size", ["1024\u00d71024", "1024X1024", "1024 x 1024", "x", ""])
def test_bad_sizes(size: str) -> None:
    with pytest.raises(GatewayError) as err:
        dashscope_size(size)
    assert err.value.status == 400 and err.value.openai_code == "invalid_image_request"


def parse(**fields: Any) -> ImageRequest:
    return parse_request({"prompt": "p", **fields}, default_model="m", default_format="b64_json")


def test_request_coercions() -> None:
    req = parse(seed="123456", n="2", watermark="false", prompt_upsampling=True)
    assert (req.seed, req.n, req.watermark, req.prompt_extend) == (123456, 2, False, True)
    assert parse(prompt_extend=False, prompt_upsampling=True).prompt_extend is False
    assert parse().response_format == "b64_json" and parse().model == "m"
    assert parse(stream=False).n == 1
    for bad in (
        {"seed": True},
        {"n": 1.5},
        {"watermark": "yes"},
        {"negative_prompt": 3},
        {"quality": 1},
        {"image": 7},
        {"image": "data:text/plain;base64,aGk="},
    ):
        with pytest.raises(GatewayError):
            parse(**bad)


def test_routing_table() -> None:
    assert lookup("qwen-image-2.0-pro-2026-03-03") is lookup("qwen-image-2.0-pro")
    assert lookup("qwen-image-9.0") is None  # not in DashScope's catalogue
    assert lookup("qwen-image-3.0-pro-2026-09-01") is lookup("qwen-image-3.0-pro")
    assert lookup("wan2.7-image-0915") is lookup("wan2.7-image")
    none: dict[str, ModelOverride] = {}
    assert resolve("qwen-image-2.0", none).endpoint is Endpoint.MULTIMODAL
    assert resolve("qwen-image-plus", none).endpoint is Endpoint.MULTIMODAL
    assert resolve("wan2.6-image", none).endpoint is Endpoint.MULTIMODAL
    assert resolve("wan2.2-t2i-flash", none).endpoint is Endpoint.TEXT2IMAGE
    assert resolve("wanx-v1", none).mode == "async"
    assert resolve("wan2.5-i2i-preview", none).endpoint is Endpoint.IMAGE2IMAGE
    unknown = resolve("qwen-image-9", none)
    assert (unknown.known, unknown.endpoint) == (False, Endpoint.MULTIMODAL)
    over = {
        "gpt-image-1": ModelOverride(target="wan2.6-t2i"),
        "wan2.6-t2i": ModelOverride(mode="async"),
        "qwen-image": ModelOverride(async_only=True),
        "wan2.2-t2i-plus": ModelOverride(mode="sync"),
    }
    alias = resolve("gpt-image-1", over)
    assert (alias.target, alias.mode, alias.endpoint) == (
        "wan2.6-t2i",
        "async",
        Endpoint.IMAGE_GENERATION,
    )
    assert resolve("qwen-image", over).endpoint is Endpoint.TEXT2IMAGE
    assert resolve("qwen-image", over).async_only
    synced = resolve("wan2.2-t2i-plus", over)
    assert (synced.mode, synced.endpoint) == ("sync", Endpoint.TEXT2IMAGE)


def test_impossible_overrides_are_config_errors() -> None:
    text = """
upstreams: [{name: u, base_url: "http://127.0.0.1:1/api/v1", api_key: k}]
keys: [{name: a, key: "0123456789"}]
models:
  qwen-image-2.0: {mode: async}
  wanx-v1: {mode: sync}
  qwen-image-max: {async_only: true}
  wan2.6-t2i: {mode: sync, async_only: true}
  wan2.6-image: {mode: async}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, {})
    where = [p.split(":")[0] for p in err.value.problems]
    assert where == [
        "models.qwen-image-2.0",
        "models.wanx-v1",
        "models.qwen-image-max",
        "models.wan2.6-t2i",
    ]


def test_every_image_of_every_shape() -> None:
    body = {
        "output": {
            "choices": [
                {"message": {"role": "assistant", "content": [{"image": "u1"}, {"image": "u2"}]}},
                {
                    "message": {
                        "role": "assistant",
                        "content": [
                            {"type": "text", "text": "t"},
                            {"type": "image", "image": "u3"},
                        ],
                    }
                },
            ],
            "results": [
                {"url": "u4", "actual_prompt": "better"},
                {"code": "DataInspectionFailed", "message": "no"},
            ],
        }
    }
    got = images_of(body)
    assert [i.url for i in got] == ["u1", "u2", "u3", "u4"]
    assert got[3].revised_prompt == "better"
    assert images_of({"output": None}) == [] and images_of("x") == []


def test_dashscope_bodies() -> None:
    req = parse(
        negative_prompt="n", size="1024x1024", seed=3, style="<anime>", image=["https://e/x.png"]
    )
    msg = dashscope_body(req, resolve("wan2.6-image", {}))
    assert msg["input"]["messages"][0]["content"] == [{"text": "p"}, {"image": "https://e/x.png"}]
    assert msg["parameters"] == {
        "n": 1,
        "size": "1024*1024",
        "seed": 3,
        "style": "<anime>",
        "negative_prompt": "n",
    }
    prompt = dashscope_body(req, resolve("wan2.5-i2i-preview", {}))
    assert prompt["input"] == {"prompt": "p", "negative_prompt": "n", "images": ["https://e/x.png"]}
    assert "negative_prompt" not in prompt["parameters"]


def test_aliyun_native_body_rewrite() -> None:
    obj = {
        "model": "wanx-v1",
        "parameters": {"n": 1, "negative_prompt": "x"},
        "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
    }
    out = native_body(obj, resolve("wanx-v1", {}))
    assert out == {
        "model": "wanx-v1",
        "parameters": {"n": 1},
        "input": {"prompt": "hi", "negative_prompt": "x"},
    }
    same = {"model": "wanx-v1", "input": {"prompt": "hi"}}
    assert native_body(same, resolve("wanx-v1", {})) == same


@pytest.mark.parametrize(
    ("status", "code", "etype", "ocode"),
    [
        (401, "InvalidApiKey", "authentication_error", "InvalidApiKey"),
        (403, "AccessDenied", "permission_error", "AccessDenied"),
        (429, "Throttling", "rate_limit_error", "Throttling"),
        (400, "DataInspectionFailed", "invalid_request_error", "content_policy_violation"),
        (400, "InvalidParameter", "invalid_request_error", "InvalidParameter"),
        (503, "ServiceUnavailable", "server_error", "ServiceUnavailable"),
    ],
)
def test_error_mapping(status: int, code: str, etype: str, ocode: str) -> None:
    err = upstream_error(status, code, "m", retry_after=3)
    body = err.openai_body()["error"]
    assert (err.status, body["type"], body["code"]) == (status, etype, ocode)
    assert err.retry_after == (3 if status == 429 else None)
    assert status_for_code(code) == status or status == 503


def test_fetch_policy() -> None:
    up = UpstreamConfig(name="u", base_url="http://127.0.0.1:9/api/v1", api_key="k")
    policy = FetchPolicy.build(ImageFetchConfig(), [up])
    ok = [
        "https://dashscope-result-bj.oss-cn-beijing.aliyuncs.com/a.png?Expires=1",
        "http://127.0.0.1:1234/_sim/images/a.png",
    ]
    bad = [
        "https://aliyuncs.com.evil.example/a.png",
        "ftp://x.aliyuncs.com/a",
        "https://user@x.aliyuncs.com/a",
        "http://localhost/a",
        "http://169.254.169.254/x",
    ]
    assert all(policy.allows(URL(u)) for u in ok)
    assert not any(policy.allows(URL(u)) for u in bad)


def test_fetcher_against_a_real_server(loop_thread: LoopThread) -> None:
    image = png()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.url.with_path("/ok")))

    async def away(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.url.with_host("localhost").with_path("/ok")))

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=image)

    app = web.Application()
    for path, handler in (
        ("/ok", ok),
        ("/hop", hop),
        ("/away", away),
        ("/loop", loop),
        ("/slow", slow),
    ):
        app.router.add_get(path, handler)
    live = loop_thread.serve(app)
    policy = FetchPolicy(("127.0.0.1",), 100_000, 0.5)

    async def run(paths: list[str], pol: FetchPolicy = policy) -> list[bytes] | GatewayError:
        async with aiohttp.ClientSession() as session:
            try:
                return await fetch_all(session, [live.url + p for p in paths], pol)
            except GatewayError as err:
                return err

    got = loop_thread.run(run(["/ok", "/hop"]))
    assert got == [image, image]
    for paths, reason in (
        (["/ok", "/away"], "data[1] (2 of 2) for b64_json: host 'localhost'"),
        (["/loop"], "more than 3 redirects"),
        (["/slow"], "timed out after 0.5 s"),
        (["/missing"], "answered HTTP 404"),
    ):
        err = loop_thread.run(run(paths))
        assert isinstance(err, GatewayError) and reason in err.message, (paths, err)
        assert err.status == 502 and err.openai_code == "image_fetch_failed"
    small = FetchPolicy(("127.0.0.1",), 100, 5)
    err = loop_thread.run(run(["/ok"], small))
    assert isinstance(err, GatewayError) and "larger than 100 bytes" in err.message
    loop_thread.stop(live)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 1000, 3 * 1024 * 1024 + 1])
def test_base64_string_is_the_standard_encoding_inside_the_answer(size: int) -> None:
    data = os.urandom(size)
    answer = dumps({"data": [{"b64_json": base64_string(data), "revised_prompt": 'é\n"'}]})
    item = loads(answer)["data"][0]
    assert item["b64_json"] == base64.b64encode(data).decode("ascii")
    assert base64.b64decode(item["b64_json"], validate=True) == data
    assert item["revised_prompt"] == 'é\n"'
