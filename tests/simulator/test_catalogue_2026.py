"""Pure tests of the 2026 catalogue: the new models' limits, the dated-snapshot rule, the
reshaping directives and the answers they produce (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.simulator.catalogue import CATALOGUE, Endpoint, lookup_model, snapshot_family
from proxy.simulator.errors import FAULT_ERRORS, ApiError
from proxy.simulator.faults import AnswerShape, Faults, faults_in_prompt, parse_directives
from proxy.simulator.models import GenRequest, validate
from proxy.simulator.results import TEXT_IN_PLACE, Produced, stream_chunks, sync_result

E1, E2 = Endpoint.MULTIMODAL, Endpoint.IMAGE_GENERATION
IMG = "https://example.com/a.png"
DATA_IMG = "data:image/png;base64,AAAA"


def body(model: str, params: dict[str, Any] | None = None, images: int = 0) -> dict[str, Any]:
    # Images before the text, as DashScope's qwen-image-3.0 examples write them.
    content: list[dict[str, str]] = [{"image": IMG}] * images + [{"text": "a cat"}]
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": content}]},
        "parameters": params or {},
    }


def ok(
    endpoint: Endpoint, payload: Any, *, is_async: bool = False, sse: bool = False
) -> GenRequest:
    result = validate(endpoint, payload, async_header=is_async, sse=sse)
    assert isinstance(result, GenRequest), result
    return result


def refused(endpoint: Endpoint, payload: Any, *, is_async: bool = False) -> ApiError:
    result = validate(endpoint, payload, async_header=is_async, sse=False)
    assert isinstance(result, ApiError), result
    return result


@pytest.mark.parametrize("model", ["qwen-image-3.0", "qwen-image-3.0-pro"])
def test_qwen3_limits(model: str) -> None:
    default = ok(E1, body(model))
    assert (default.n, default.width, default.height) == (1, 2048, 2048)
    for images in range(4):
        assert len(ok(E1, body(model, images=images)).images) == images
    assert ok(E1, body(model, {"n": 6, "size": "512*512"})).n == 6
    passed = {"enable_thinking": False, "prompt_extend_model": "agent"}
    assert ok(E1, body(model, passed)).n == 1
    for bad in (
        body(model, images=4),
        body(model, {"n": 7}),
        body(model, {"size": "511*512"}),
        body(model, {"size": "2048*2049"}),
        body(model, {"enable_thinking": "yes"}),
        body(model, {"prompt_extend_model": "creative"}),
    ):
        assert (refused(E1, bad).status, refused(E1, bad).code) == (400, "InvalidParameter")
    assert refused(E2, body(model), is_async=True).code == "AccessDenied"  # E1 sync only


def test_z_image_turbo_is_permissive_text_to_image() -> None:
    req = ok(E1, body("z-image-turbo"))
    assert (req.n, req.width, req.height) == (1, 1024, 1536)
    assert ok(E1, body("z-image-turbo", {"n": 6, "size": "2048*2048"})).n == 6
    assert refused(E1, body("z-image-turbo", images=1)).code == "InvalidParameter"
    assert refused(E1, body("z-image-turbo", {"n": 7})).code == "InvalidParameter"


@pytest.mark.parametrize(
    "model", ["qwen-image-edit", "qwen-image-edit-plus", "qwen-image-edit-max"]
)
def test_qwen_edit_needs_one_to_three_images(model: str) -> None:
    assert refused(E1, body(model)).code == "InvalidParameter"
    assert refused(E1, body(model, images=4)).code == "InvalidParameter"
    assert len(ok(E1, body(model, images=3)).images) == 3
    assert CATALOGUE[model].endpoints == frozenset({E1})


@pytest.mark.parametrize("model", ["wan2.7-image", "wan2.7-image-pro"])
def test_wan27_takes_zero_to_four_images_in_both_modes(model: str) -> None:
    extras = {"thinking_mode": True, "enable_sequential": True, "bbox_list": [[0, 0, 9, 9]]}
    text_only = ok(E1, body(model, extras))
    assert (text_only.n, text_only.width, text_only.images) == (4, 1280, ())
    assert len(ok(E2, body(model, {"n": 1}, images=4), is_async=True).images) == 4
    interleave = {"enable_interleave": True, "max_images": 2}
    streamed = ok(E1, body(model, interleave, images=4), sse=True)
    assert streamed.interleave and streamed.image_count == 2
    assert refused(E1, body(model, images=5)).code == "InvalidParameter"
    # wan2.6-image keeps its stricter rules.
    assert refused(E1, body("wan2.6-image")).code == "InvalidParameter"
    two = validate(E1, body("wan2.6-image", interleave, images=2), async_header=False, sse=True)
    assert isinstance(two, ApiError) and two.code == "InvalidParameter"


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("qwen-image-3.0-pro-2026-09-01", "qwen-image-3.0-pro"),
        ("qwen-image-2.0-pro-2026-04-22", "qwen-image-2.0-pro"),
        ("wan2.7-image-0229", "wan2.7-image"),
        ("z-image-turbo-1231", "z-image-turbo"),
        ("qwen-image-2026-13-01", None),
        ("qwen-image-1340", None),
        ("qwen-image-20260901", None),
        ("qwen-image-3.0-pro", None),
    ],
)
def test_snapshot_family(name: str, family: str | None) -> None:
    assert snapshot_family(name) == family


def test_snapshots_behave_as_their_family() -> None:
    spec = lookup_model("qwen-image-3.0-pro-2026-09-01")
    family = CATALOGUE["qwen-image-3.0-pro"]
    assert spec is not None and spec.name == "qwen-image-3.0-pro-2026-09-01"
    assert (spec.family, spec.endpoints, spec.size, spec.n_max) == (
        family.family,
        family.endpoints,
        family.size,
        family.n_max,
    )
    for listed in ("qwen-image-plus-2026-01-09", "qwen-image-edit-max-2026-01-16"):
        assert lookup_model(listed) is not None, listed
    assert lookup_model("dall-e-3-2026-01-01") is None
    assert lookup_model("qwen-image-2.0-pro-2026-04-22-2026-05-01") is None  # no double dates
    snapshot = ok(E1, body("qwen-image-3.0-2026-09-01", {"n": 6}, images=3))
    assert snapshot.model == "qwen-image-3.0-2026-09-01" and snapshot.n == 6
    assert refused(E1, body("qwen-image-3.0-2026-09-01", images=4)).code == "InvalidParameter"


def test_new_error_kinds() -> None:
    burst = FAULT_ERRORS["burst"]
    assert (burst.status, burst.code) == (429, "Throttling.BurstRate")
    assert burst.message == "Request rate increased too quickly, please slow down."
    throttling = FAULT_ERRORS["throttling"]
    assert (throttling.status, throttling.code, throttling.message) == (
        429,
        "Throttling",
        "Requests throttling triggered.",
    )
    assert parse_directives("sse-error=burst") == (Faults(sse_error="burst"), [])


def test_reshaping_directives_parse() -> None:
    faults, problems = parse_directives("base64; textitem nocount")
    assert problems == []
    assert faults.shape == AnswerShape(inline_images=True, text_item=True, no_count=True)
    assert faults_in_prompt("a cat [sim:base64]").shape == AnswerShape(inline_images=True)
    assert parse_directives("base64=yes")[1]  # flags take no value


def test_qwen3_answer_shape() -> None:
    req = ok(E1, body("qwen-image-3.0-pro", {"n": 2, "size": "1024*1024"}, images=2))
    answer = sync_result(req, "rid", Produced(("u1", "u2")))
    assert [c["message"]["content"] for c in answer["output"]["choices"]] == [
        [{"image": "u1"}],
        [{"image": "u2"}],
    ]
    assert answer["output"]["rewrite_status"] == "success"
    assert answer["usage"] == {
        "output_image_count": 2,
        "input_image_count": 2,
        "output_width": 1024,
        "output_height": 1024,
        "output_image_type": "url",
        "input_image_type": "url",
    }
    text_only = ok(E1, body("qwen-image-3.0", {"prompt_extend": False}))
    plain = sync_result(text_only, "rid", Produced(("u",)))
    assert "input_image_type" not in plain["usage"] and "rewrite_status" not in plain["output"]
    assert plain["usage"]["input_image_count"] == 0


def test_qwen3_input_image_type_follows_the_inputs() -> None:
    payload = body("qwen-image-3.0")
    payload["input"]["messages"][0]["content"].insert(0, {"image": DATA_IMG})
    answer = sync_result(ok(E1, payload), "rid", Produced(("u",), inline=True))
    assert answer["usage"]["input_image_type"] == "base64"
    assert answer["usage"]["output_image_type"] == "base64"


def test_textitem_replaces_the_last_image_in_every_family() -> None:
    qwen3 = sync_result(
        ok(E1, body("qwen-image-3.0", {"n": 2})), "r", Produced(("a", "b"), text_last=True)
    )
    assert qwen3["output"]["choices"][1]["message"]["content"] == [{"text": TEXT_IN_PLACE}]
    assert qwen3["usage"]["output_image_count"] == 1
    edit = ok(E1, body("qwen-image-edit-plus", {"n": 2}, images=1))
    edited = sync_result(edit, "r", Produced(("a", "b"), text_last=True))
    assert edited["output"]["choices"][0]["message"]["content"] == [
        {"image": "a"},
        {"text": TEXT_IN_PLACE},
    ]
    assert edited["usage"]["image_count"] == 1
    wan = sync_result(ok(E1, body("wan2.6-t2i", {"n": 1})), "r", Produced(("a",), text_last=True))
    assert wan["output"]["choices"][0]["message"]["content"] == [
        {"type": "text", "text": TEXT_IN_PLACE}
    ]
    assert wan["usage"]["image_count"] == 0


def test_nocount_drops_only_the_count() -> None:
    qwen3 = sync_result(ok(E1, body("qwen-image-3.0")), "r", Produced(("a",), no_count=True))
    assert "output_image_count" not in qwen3["usage"] and qwen3["usage"]["output_width"] == 2048
    qwen = sync_result(ok(E1, body("qwen-image-2.0")), "r", Produced(("a",), no_count=True))
    assert qwen["usage"] == {"width": 2048, "height": 2048}
    assert qwen["output"]["choices"][0]["message"]["content"] == [{"image": "a"}]
    interleave = {"enable_interleave": True, "max_images": 1}
    req = ok(E1, body("wan2.7-image", interleave), sse=True)
    chunks = stream_chunks(req, "r", Produced(("a",), no_count=True))
    assert chunks[-1]["output"]["finished"] is True
    assert "image_count" not in chunks[-1]["usage"] and chunks[-1]["usage"]["size"] == "1280*1280"
