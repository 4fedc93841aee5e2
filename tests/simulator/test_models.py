"""Table tests of the pure validation functions (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.simulator.catalogue import CATALOGUE, Endpoint, lookup_model
from proxy.simulator.errors import ApiError
from proxy.simulator.models import GenRequest, check_route, validate
from proxy.simulator.parsing import check_size, is_image_ref, parse_size

E1, E2, E3, E4 = (
    Endpoint.MULTIMODAL,
    Endpoint.IMAGE_GENERATION,
    Endpoint.TEXT2IMAGE,
    Endpoint.IMAGE2IMAGE,
)
IMG = "https://example.com/a.png"


def messages(*items: dict[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(items)}]}


def e1(model: str, params: dict[str, Any] | None = None, *extra: dict[str, str]) -> Any:
    return {"model": model, "input": messages({"text": "a cat"}, *extra), "parameters": params}


def e3(model: str, params: dict[str, Any] | None = None, **inp: Any) -> Any:
    return {"model": model, "input": {"prompt": "a cat", **inp}, "parameters": params or {}}


VALID: list[tuple[Endpoint, Any, bool, tuple[int, int, int]]] = [
    # endpoint, body, async header, expected (n, width, height)
    (E1, e1("qwen-image-2.0-pro"), False, (1, 2048, 2048)),
    (E1, e1("qwen-image-2.0-pro", {"n": 6, "size": "512*512"}), False, (6, 512, 512)),
    (E1, e1("qwen-image-2.0-pro-2026-03-03"), False, (1, 2048, 2048)),
    (E1, e1("qwen-image-max", {"size": "1024*1024"}), False, (1, 1024, 1024)),
    (E1, e1("qwen-image-max"), False, (1, 1664, 928)),
    (E1, e1("qwen-image-plus", {"size": "928*1664"}), False, (1, 928, 1664)),
    (E1, e1("qwen-image"), False, (1, 1664, 928)),
    (E1, e1("qwen-image-edit-plus", {"n": 6}, {"image": IMG}), False, (6, 1024, 1024)),
    (E1, e1("qwen-image-edit", None, {"image": IMG}, {"image": IMG}), False, (1, 1024, 1024)),
    (E1, e1("wan2.6-t2i"), False, (4, 1280, 1280)),
    (E1, e1("wan2.6-t2i", {"size": "1696*960", "n": 1}), False, (1, 1696, 960)),
    (E1, e1("wan2.6-image", {"size": "2K"}, {"image": IMG}), False, (4, 2048, 2048)),
    (E2, e1("wan2.6-t2i", {"is_async": True, "n": 2}), True, (2, 1280, 1280)),
    (E2, e1("wan2.6-image", {"enable_interleave": True, "max_images": 3}), True, (1, 1280, 1280)),
    (E3, e3("qwen-image-plus", {"size": "1328*1328"}), True, (1, 1328, 1328)),
    (E3, e3("wan2.5-t2i-preview", {"size": "1440*1440"}), True, (4, 1440, 1440)),
    (E3, e3("wan2.2-t2i-flash", {"size": "512*1440"}), True, (4, 512, 1440)),
    (E3, e3("wan2.2-t2i-flash", {"n": 1}), False, (1, 1024, 1024)),  # sync_call
    (E3, e3("wanx2.1-t2i-turbo"), True, (4, 1024, 1024)),
    (E3, e3("wanx-v1", {"style": "<anime>", "size": "720*1280"}), True, (4, 720, 1280)),
    (E4, e3("wan2.5-i2i-preview", {"n": 1}, images=[IMG]), True, (1, 1280, 1280)),
    (
        E4,
        e3("wanx2.1-imageedit", function="stylization_all", base_image_url=IMG),
        True,
        (1, 1024, 1024),
    ),
]


@pytest.mark.parametrize(("endpoint", "body", "is_async", "expected"), VALID)
def test_valid_requests(
    endpoint: Endpoint, body: Any, is_async: bool, expected: tuple[int, int, int]
) -> None:
    result = validate(endpoint, body, async_header=is_async, sse=False)
    assert isinstance(result, GenRequest), result
    assert (result.n, result.width, result.height) == expected


INVALID: list[tuple[Endpoint, Any, bool, tuple[int, str]]] = [
    (E1, [], False, (400, "InvalidParameter")),
    (E1, {"input": messages({"text": "x"})}, False, (400, "BadRequest.EmptyModel")),
    (E1, {"model": "", "input": {}}, False, (400, "BadRequest.EmptyModel")),
    (E1, {"model": "qwen-image-2.0"}, False, (400, "BadRequest.EmptyInput")),
    (E1, e1("dall-e-3"), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0"), True, (403, "AccessDenied")),
    (E3, e3("qwen-image-2.0"), True, (403, "AccessDenied")),
    (E3, e3("qwen-image-2.0"), False, (400, "InvalidParameter")),  # url error
    (E3, e3("qwen-image-plus"), False, (403, "AccessDenied")),  # no sync_call
    (E2, e1("wan2.6-t2i"), False, (403, "AccessDenied")),
    (E2, e1("qwen-image-plus"), True, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"size": "511*511"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"size": "2049*2048"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"size": "1024x1024"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"size": 1024}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"n": 0}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"n": True}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"n": "2"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"seed": 2147483648}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"seed": "123"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", {"watermark": "no"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-max", {"n": 2}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-plus", {"size": "1024*1024"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", None, {"image": IMG}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-2.0", None, {"text": "two"}), False, (400, "InvalidParameter")),
    (E1, e1("qwen-image-edit"), False, (400, "InvalidParameter")),  # needs an image
    (E1, e1("qwen-image-edit", {"n": 2}, {"image": IMG}), False, (400, "InvalidParameter")),
    (E1, e1("wan2.6-t2i", {"size": "1024*1024"}), False, (400, "InvalidParameter")),
    (E1, e1("wan2.6-t2i", {"size": "3000*700"}), False, (400, "InvalidParameter")),
    (E1, e1("wan2.6-t2i", {"n": 5}), False, (400, "InvalidParameter")),
    (E1, e1("wan2.6-image"), False, (400, "InvalidParameter")),  # edit needs an image
    (
        E1,
        e1("wan2.6-image", {"size": "1000*1000"}, {"image": IMG}),
        False,
        (400, "InvalidParameter"),
    ),
    (E1, e1("wan2.6-image", None, {"image": "/tmp/x.png"}), False, (400, "InvalidURL")),
    (E1, e1("wan2.6-image", {"enable_interleave": True}), False, (400, "InvalidParameter")),
    (E2, e1("wan2.6-image", {"enable_interleave": True, "n": 2}), True, (400, "InvalidParameter")),
    (
        E2,
        e1("wan2.6-image", {"enable_interleave": True, "max_images": 6}),
        True,
        (400, "InvalidParameter"),
    ),
    (E3, {"model": "wanx-v1", "input": {"prompt": ""}}, True, (400, "InvalidParameter")),
    (E3, e3("wanx-v1", {"style": "<cubism>"}), True, (400, "InvalidParameter")),
    (E3, e3("wanx-v1", {"size": "1024*768"}), True, (400, "InvalidParameter")),
    (E3, e3("wan2.2-t2i-flash", {"size": "1500*1024"}), True, (400, "InvalidParameter")),
    (E3, e3("wan2.5-t2i-preview", {"size": "1024*1024"}), True, (400, "InvalidParameter")),
    (E4, e3("wan2.5-i2i-preview"), True, (400, "InvalidParameter")),
    (E4, e3("wan2.5-i2i-preview", images=[IMG] * 4), True, (400, "InvalidParameter")),
    (E4, e3("wanx2.1-imageedit", base_image_url=IMG), True, (400, "InvalidParameter")),
    (
        E1,
        {"model": "qwen-image-2.0", "input": {"messages": [{"content": "x"}]}},
        False,
        (400, "InvalidParameter"),
    ),
    (
        E1,
        {
            "model": "qwen-image-2.0",
            "input": {
                "messages": [
                    {"role": "system", "content": [{"text": "x"}]},
                    {"role": "user", "content": [{"text": "x"}]},
                ]
            },
        },
        False,
        (400, "InvalidParameter"),
    ),
]


@pytest.mark.parametrize(("endpoint", "body", "is_async", "expected"), INVALID)
def test_invalid_requests(
    endpoint: Endpoint, body: Any, is_async: bool, expected: tuple[int, str]
) -> None:
    result = validate(endpoint, body, async_header=is_async, sse=False)
    assert isinstance(result, ApiError), result
    assert (result.status, result.code) == expected
    assert result.message


def test_long_prompts_are_truncated_not_rejected() -> None:
    body = {
        "model": "wan2.2-t2i-flash",
        "input": {"prompt": "p" * 900, "negative_prompt": "n" * 900},
    }
    result = validate(E3, body, async_header=True, sse=False)
    assert isinstance(result, GenRequest)
    assert len(result.prompt) == 500 and len(result.negative_prompt) == 500


def test_interleave_on_e1_needs_sse_and_counts_max_images() -> None:
    body = e1("wan2.6-image", {"enable_interleave": True, "max_images": 3})
    result = validate(E1, body, async_header=False, sse=True)
    assert isinstance(result, GenRequest)
    assert result.interleave and result.image_count == 3


def test_type_keyed_content_items_are_accepted() -> None:
    body = {
        "model": "wan2.6-image",
        "input": messages({"type": "text", "text": "x"}, {"type": "image", "image": IMG}),
    }
    result = validate(E1, body, async_header=False, sse=False)
    assert isinstance(result, GenRequest) and result.images == (IMG,)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024*1024", (1024, 1024)),
        (" 1664 * 928 ", (1664, 928)),
        ("1024x1024", None),
        ("1024×1024", None),
        ("*1024", None),
        ("", None),
        ("1K", None),
    ],
)
def test_parse_size(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_size(text) == expected


def test_check_size_rules() -> None:
    wan26 = CATALOGUE["wan2.6-t2i"].size
    assert check_size(wan26, 1280, 1280) is None
    assert check_size(wan26, 1440, 1440) is None
    assert check_size(wan26, 1441, 1440) is not None
    assert check_size(CATALOGUE["wan2.6-image"].size, 1288, 1280) is not None  # not /16
    assert check_size(CATALOGUE["qwen-image"].size, 1328, 1328) is None
    assert check_size(CATALOGUE["qwen-image"].size, 1329, 1328) is not None


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (IMG, True),
        ("http://x/y.png", True),
        ("data:image/png;base64,AAAA", True),
        ("data:text/plain;base64,AAAA", False),
        ("data:image/png,raw", False),
        ("oss://dashscope-instant/a.png", True),
        ("oss://", False),
        ("/tmp/a.png", False),
        ("file:///tmp/a.png", False),
    ],
)
def test_is_image_ref(value: str, ok: bool) -> None:
    assert is_image_ref(value) is ok


def test_routes_of_every_model() -> None:
    for spec in CATALOGUE.values():
        for endpoint in spec.endpoints:
            needs_async = endpoint is not Endpoint.MULTIMODAL
            assert check_route(spec, endpoint, async_header=needs_async) is None, spec.name
    plus = lookup_model("qwen-image-plus")
    assert plus is not None and plus.async_capable
    pro = lookup_model("qwen-image-2.0-pro")
    assert pro is not None and not pro.async_capable
    assert lookup_model("wan2.1-t2i-turbo") is None
