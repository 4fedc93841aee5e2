"""`Idempotency-Key` on /v1/images/generations and /v1/images/edits, with the OpenAI SDK.

The SDK sends the header with `extra_headers`; it keeps the header on its own retries,
so a retry after a 409 (which the SDK retries, honouring `Retry-After`) gets the kept
answer instead of a second generation.
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import openai
import pytest
import requests
from urllib3 import encode_multipart_formdata

from tests.conftest import KEY_A, KEY_B, Gateway, GatewayFactory
from tests.openai_helpers import client, png, sim_generations
from tests.support import Live


def generate(gw: Gateway, idem: str, prompt: str = "a lighthouse", **kwargs: Any) -> Any:
    return client(gw, kwargs.pop("key", KEY_A)).images.generate(
        model=kwargs.pop("model", "qwen-image-2.0"),
        prompt=prompt,
        response_format="url",
        extra_headers={"Idempotency-Key": idem},
        **kwargs,
    )


def test_generation_replayed_once_generated(gateway: Gateway, sim: Live) -> None:
    first = generate(gateway, "g-1", n=2)
    again = generate(gateway, "g-1", n=2)
    assert first.data is not None and len(first.data) == 2
    assert again.model_dump() == first.model_dump()
    assert len(sim_generations(sim)) == 1
    assert gateway.images("team-a", "qwen-image-2.0") == 2
    raw = requests.post(
        gateway.url + "/v1/images/generations",
        json={"model": "qwen-image-2.0", "prompt": "a lighthouse", "response_format": "url"}
        | {"n": 2},
        headers={"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "g-1"},
        timeout=30,
    )
    assert raw.status_code == 200 and raw.headers["Idempotency-Replayed"] == "true"
    assert gateway.metric("dashscope_proxy_idempotent_replays_total", key="team-a") == 2


def test_other_content_is_422_and_keys_are_per_gateway_key(gateway: Gateway, sim: Live) -> None:
    generate(gateway, "shared")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        generate(gateway, "shared", prompt="a different lighthouse")
    assert err.value.code == "idempotency_key_reused"
    other = generate(gateway, "shared", key=KEY_B)  # team-b's "shared" is its own
    assert other.data is not None
    assert len(sim_generations(sim)) == 2


def test_edit_replayed_with_a_fresh_boundary(gateway: Gateway, sim: Live) -> None:
    image = png(shade=40)

    def edit() -> Any:
        return client(gateway).images.edit(
            model="qwen-image-edit-plus",
            prompt="make it blue",
            response_format="url",
            image=[("a.png", io.BytesIO(image), "image/png")],
            extra_headers={"Idempotency-Key": "e-1"},
        )

    first, again = edit(), edit()
    assert again.model_dump() == first.model_dump()
    fields = {
        "model": "qwen-image-edit-plus",
        "prompt": "make it blue",
        "response_format": "url",
    }
    # The same parts under two boundaries are the same content.
    for i, boundary in enumerate(("boundary-one", "another-boundary-2")):
        data, ctype = encode_multipart_formdata(
            [("image[]", ("a.png", image, "image/png")), *fields.items()], boundary=boundary
        )
        raw = requests.post(
            gateway.url + "/v1/images/edits",
            data=data,
            headers={"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "e-2"}
            | {"Content-Type": ctype},
            timeout=30,
        )
        assert raw.status_code == 200, raw.text
        assert raw.headers.get("Idempotency-Replayed") == ("true" if i else None)
    other, ctype = encode_multipart_formdata(
        [("image[]", ("a.png", png(shade=41), "image/png")), *fields.items()]
    )
    changed = requests.post(
        gateway.url + "/v1/images/edits",
        data=other,
        headers={"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "e-2"}
        | {"Content-Type": ctype},
        timeout=30,
    )
    assert changed.status_code == 422  # other file bytes: other content
    assert len(sim_generations(sim)) == 2


def test_async_only_submit_replayed_same_task(start_gateway: GatewayFactory, sim: Live) -> None:
    gw = start_gateway("models:\n  wan2.2-t2i-flash: {async_only: true}\n")
    sent = {"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "task-1"}
    body = {"model": "wan2.2-t2i-flash", "prompt": "a harbour", "response_format": "url"}
    first = requests.post(gw.url + "/v1/images/generations", json=body, headers=sent, timeout=30)
    again = requests.post(gw.url + "/v1/images/generations", json=body, headers=sent, timeout=30)
    assert first.status_code == again.status_code == 200
    assert first.json()["object"] == "image.generation.task"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotency-Replayed"] == "true"
    assert len(sim_generations(sim)) == 1


def test_concurrent_repeat_409_and_the_sdk_retry_gets_the_answer(
    gateway: Gateway, sim: Live
) -> None:
    results: list[Any] = []
    prompt = "a slow lighthouse [sim:slow=1.5]"
    first = threading.Thread(target=lambda: results.append(generate(gateway, "c-1", prompt)))
    first.start()
    deadline = time.monotonic() + 5
    while not sim_generations(sim) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.ConflictError) as err:
        generate(gateway, "c-1", prompt)  # no retries: the 409 itself
    assert err.value.code == "idempotency_in_progress"
    assert err.value.response.headers["Retry-After"] == "1"
    # The SDK's own retries (on by default) wait out Retry-After and get the kept answer.
    patient = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY_A, max_retries=5)
    answer = patient.images.generate(
        model="qwen-image-2.0",
        prompt=prompt,
        response_format="url",
        extra_headers={"Idempotency-Key": "c-1"},
    )
    first.join()
    assert answer.model_dump() == results[0].model_dump()
    assert len(sim_generations(sim)) == 1
