"""Every error of the OpenAI images API: exact envelopes, the SDK's exception classes, no counts."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import KEY_B, Gateway, GatewayFactory
from tests.openai_helpers import client, http, png, sim_generations
from tests.support import Live, LoopThread


def envelope(exc: openai.APIStatusError) -> dict[str, Any]:
    """The `error` object of the body (the SDK keeps `body["error"]` as `exc.body`)."""
    assert isinstance(exc.body, dict)
    return exc.body


def test_bad_gateway_key_is_authentication_error(gateway: Gateway, sim: Live) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(gateway, "not-a-key").images.generate(model="qwen-image-2.0", prompt="x")
    assert err.value.status_code == 401
    assert envelope(err.value) == {
        "message": "Invalid API-key provided.",
        "type": "authentication_error",
        "code": "invalid_api_key",
    }
    assert sim_generations(sim) == []


def test_response_format_exact_envelope(gateway: Gateway, loop_thread: LoopThread) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).images.generate(model="qwen-image-2.0", prompt="x", response_format="png")  # type: ignore[arg-type]
    assert envelope(err.value) == {
        "message": "response_format must be one of: b64_json, url",
        "type": "invalid_request_error",
        "code": "invalid_image_request",
    }
    status, body = http(
        loop_thread,
        "POST",
        gateway.url + "/v1/images/generations",
        json={"model": "qwen-image-2.0", "prompt": "x", "response_format": ""},
    )
    assert status == 400
    assert body == {
        "error": {
            "message": "response_format must be one of: b64_json, url",
            "type": "invalid_request_error",
            "code": "invalid_image_request",
        }
    }


CASES = [
    # (request fields, expected message)
    (
        {"model": "qwen-image-2.0", "prompt": "x", "size": "1024\u00d71024"},
        "size must use a lowercase x between width and height (e.g. 1024x1024), not the "
        "multiplication sign \u00d7: got '1024\u00d71024'.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "x", "size": "big"},
        "size must be WIDTHxHEIGHT with a lowercase x, e.g. 1024x1024; got 'big'.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "x", "stream": True},
        "stream: true is not supported on the images API of this gateway; omit stream or set "
        "it to false.",
    ),
    (
        {"model": "qwen-image-plus", "prompt": "x", "n": 2},
        "n must be 1 for qwen-image-plus (DashScope: num_images_per_prompt must be 1).",
    ),
    ({"model": "wan2.6-t2i", "prompt": "x", "n": 5}, "n must be between 1 and 4 for wan2.6-t2i."),
    (
        {"model": "wan2.6-t2i", "prompt": "x", "size": "1024x1024"},
        "The size 1024*1024 is not supported by wan2.6-t2i: width*height must be between "
        "1280*1280 and 1440*1440 pixels in total.",
    ),
    (
        {"model": "qwen-image-plus", "prompt": "x", "size": "1024x1024"},
        "The size 1024*1024 is not supported by qwen-image-plus: allowed sizes are 1664*928, "
        "1472*1104, 1328*1328, 1104*1472, 928*1664.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "y" * 801},
        "prompt is too long for qwen-image-2.0: 801 characters, at most 800.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "x", "seed": "-3"},
        "seed must be an integer, got '-3'.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "x", "seed": 2147483648},
        "seed must be an integer between 0 and 2147483647.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "   "},
        "prompt is required and must be a non-empty string.",
    ),
    (
        {"model": "qwen-image-2.0", "prompt": "x", "image": "https://example.com/a.png"},
        "qwen-image-2.0 does not take input images; use an edit model (qwen-image-edit, "
        "qwen-image-edit-plus, qwen-image-edit-max, wan2.6-image, qwen-image-3.0, "
        "qwen-image-3.0-pro, wan2.7-image, wan2.7-image-pro) or map this name to one in "
        "the config's models:.",
    ),
    ({"model": "wan2.6-image", "prompt": "x"}, "wan2.6-image needs 1 to 4 input images, got 0."),
    (
        {"model": "wan2.6-image", "prompt": "x", "image": "bm90IGFuIGltYWdl"},
        "image[0] is not a PNG, JPEG, WEBP, BMP or GIF image.",
    ),
]


@pytest.mark.parametrize(("fields", "message"), CASES)
def test_refused_before_any_upstream_call(
    gateway: Gateway, sim: Live, loop_thread: LoopThread, fields: dict[str, Any], message: str
) -> None:
    status, body = http(loop_thread, "POST", gateway.url + "/v1/images/generations", json=fields)
    assert (status, body) == (
        400,
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": "invalid_image_request",
            }
        },
    )
    assert sim_generations(sim) == []


def test_size_with_multiplication_sign_through_the_sdk(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).images.generate(model="qwen-image-2.0", prompt="x", size="1024\u00d71024")
    assert envelope(err.value)["code"] == "invalid_image_request"


def test_model_outside_the_keys_allowlist(gateway: Gateway, sim: Live) -> None:
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(gateway, KEY_B).images.generate(model="wan2.2-t2i-flash", prompt="x")
    assert envelope(err.value) == {
        "message": "This key is not allowed to use model 'wan2.2-t2i-flash'.",
        "type": "permission_error",
        "code": "model_not_allowed",
    }
    assert sim_generations(sim) == []


def test_dashscope_throttling_is_rate_limit_error(gateway: Gateway) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        client(gateway).images.generate(model="qwen-image-2.0", prompt="a cat [sim:error=429]")
    assert envelope(err.value) == {
        "message": "Requests rate limit exceeded, please try again later.",
        "type": "rate_limit_error",
        "code": "Throttling.RateQuota",
    }
    assert gateway.images("team-a", "qwen-image-2.0") == 0


def test_dashscope_rejecting_the_upstream_key(gateway: Gateway) -> None:
    # The operator's problem, not the caller's: a 502 naming the upstream, never
    # DashScope's InvalidApiKey (which a team would read as its own key being wrong).
    with pytest.raises(openai.InternalServerError) as err:
        client(gateway).images.generate(model="qwen-image-2.0", prompt="a cat [sim:error=401]")
    assert err.value.status_code == 502
    assert envelope(err.value) == {
        "message": "DashScope rejected the gateway's API key for upstream 'sim'. Your gateway "
        "key was accepted; tell the gateway operator (dashscope-proxy check-config --probe).",
        "type": "api_error",
        "code": "upstream_authentication_failed",
    }


CONTENT = (
    "The request was rejected by DashScope's content inspection (DataInspectionFailed: "
    "{}) Change the prompt or the input images and try again."
)


def test_content_inspection_is_a_400_the_user_understands(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).images.generate(
            model="qwen-image-2.0", prompt="a cat [sim:error=inspection]"
        )
    assert envelope(err.value) == {
        "message": CONTENT.format("Input data may contain inappropriate content."),
        "type": "invalid_request_error",
        "code": "content_policy_violation",
    }
    assert gateway.images("team-a", "qwen-image-2.0") == 0


def test_failed_task_polled_by_the_gateway(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).images.generate(
            model="wan2.2-t2i-flash", prompt="a cat [sim:fail]", size="1024x1024"
        )
    assert envelope(err.value) == {
        "message": CONTENT.format("Output data may contain inappropriate content."),
        "type": "invalid_request_error",
        "code": "content_policy_violation",
    }
    assert gateway.images("team-a", "wan2.2-t2i-flash") == 0


def test_dashscope_internal_error(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client(gateway).images.generate(model="qwen-image-2.0", prompt="a cat [sim:error=500]")
    assert err.value.status_code == 500
    assert envelope(err.value)["type"] == "server_error"
    assert envelope(err.value)["code"] == "InternalError"


def test_failed_b64_fetch_names_the_image_and_still_counts(start_gateway: GatewayFactory) -> None:
    gw = start_gateway("""
openai:
  image_fetch: {max_bytes: 16}
""")
    with pytest.raises(openai.InternalServerError) as err:
        client(gw).images.generate(
            model="qwen-image-2.0", prompt="two cats", n=2, response_format="b64_json"
        )
    assert err.value.status_code == 502
    assert envelope(err.value) == {
        "message": "Could not fetch generated image data[0] (1 of 2) for b64_json: the image "
        "is larger than 16 bytes. DashScope generated (and billed) it; retry, or ask "
        "for response_format=url.",
        "type": "server_error",
        "code": "image_fetch_failed",
    }
    # DashScope billed both images: they are counted even though the client got an error.
    assert gw.images("team-a", "qwen-image-2.0") == 2


def test_gateway_wait_deadline_names_the_task(
    start_gateway: GatewayFactory, loop_thread: LoopThread
) -> None:
    gw = start_gateway("""
openai:
  sync_wait_seconds: 0.05
""")
    with pytest.raises(openai.InternalServerError) as err:
        client(gw).images.generate(
            model="wan2.2-t2i-flash", prompt="a cat", size="1024x1024", response_format="url"
        )
    assert err.value.status_code == 504
    body = envelope(err.value)
    assert body["code"] == "generation_timeout"
    task_id = body["message"].split("task ")[1].split(" ")[0]
    assert f"GET /v1/images/generations/{task_id}" in body["message"]
    # The task is still the key's: its result is available where the message says.
    import time

    for _ in range(40):
        status, task = http(loop_thread, "GET", f"{gw.url}/v1/images/generations/{task_id}")
        assert status == 200
        if task["status"] == "SUCCEEDED":
            break
        time.sleep(0.1)
    assert task["status"] == "SUCCEEDED" and len(task["data"]) == 1
    assert gw.images("team-a", "wan2.2-t2i-flash") == 1


def test_edit_refusals(gateway: Gateway, sim: Live) -> None:
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as err:
        c.images.edit(
            model="qwen-image-edit-plus",
            image=("a.png", png(), "image/png"),
            mask=("m.png", png(), "image/png"),
            prompt="x",
        )
    assert envelope(err.value) == {
        "message": "mask is not supported: DashScope's edit models take the instruction from "
        "the prompt; describe the change there.",
        "type": "invalid_request_error",
        "code": "invalid_image_request",
    }
    with pytest.raises(openai.BadRequestError) as err:
        c.images.edit(model="qwen-image-2.0", image=("a.png", png(), "image/png"), prompt="x")
    assert envelope(err.value)["message"].startswith("qwen-image-2.0 does not take input images")
    with pytest.raises(openai.BadRequestError) as err:
        c.images.edit(
            model="qwen-image-edit-plus", image=("a.txt", b"hello", "text/plain"), prompt="x"
        )
    assert envelope(err.value)["message"] == "image[0] is not a PNG, JPEG, WEBP, BMP or GIF image."
    assert sim_generations(sim) == []


def test_unknown_path_under_v1_is_openai_shaped(gateway: Gateway, loop_thread: LoopThread) -> None:
    status, body = http(loop_thread, "GET", gateway.url + "/v1/images/variations")
    assert status in (404, 405)
    assert set(body["error"]) == {"message", "type", "code"}
