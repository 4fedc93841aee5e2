"""The official DashScope SDK against gateway + simulator, every flow, over real sockets."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import dashscope
import pytest
import requests
from dashscope import ImageSynthesis, MultiModalConversation
from dashscope.aigc.image_generation import ImageGeneration
from dashscope.api_entities.dashscope_response import Message

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, Gateway, GatewayFactory
from tests.support import Live


def msgs(text: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"text": text}]}]


def sim_requests(sim: Live) -> list[dict[str, object]]:
    return requests.get(sim.url + "/_sim/requests", timeout=5).json()["requests"]


def test_multimodal_sync_n2_metered_and_key_swapped(ds: Gateway, sim: Live) -> None:
    rsp = MultiModalConversation.call(
        model="qwen-image-2.0-pro", messages=msgs("a red fox"), n=2, size="1024*1024"
    )
    assert rsp.status_code == 200, rsp
    choices = rsp.output.choices
    assert len(choices) == 2
    url = choices[0].message.content[0]["image"]
    png = requests.get(url, timeout=5)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert rsp.usage["image_count"] == 2
    assert ds.images("team-a", "qwen-image-2.0-pro") == 2
    seen = sim_requests(sim)[-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY_A not in str(seen)


def test_streaming_interleave_counts_final_event(ds: Gateway) -> None:
    chunks = list(
        ImageGeneration.call(
            model="wan2.6-image",
            messages=[Message(role="user", content=[{"text": "a tutorial"}])],
            stream=True,
            enable_interleave=True,
            max_images=3,
            size="1280*1280",
        )
    )
    assert len(chunks) >= 3, chunks
    assert all(c.status_code == 200 for c in chunks)
    assert chunks[-1].usage["image_count"] == 3
    assert ds.images("team-a", "wan2.6-image") == 3


def test_image_generation_sync_and_async_wait(ds: Gateway) -> None:
    m = [Message(role="user", content=[{"text": "a flower shop"}])]
    rsp = ImageGeneration.call(model="wan2.6-t2i", messages=m, n=2, size="1280*1280")
    assert rsp.status_code == 200, rsp
    assert ds.images("team-a", "wan2.6-t2i") == 2
    job = ImageGeneration.async_call(model="wan2.6-t2i", messages=m, n=1, size="1280*1280")
    assert job.status_code == 200 and job.output.task_status == "PENDING"
    done = ImageGeneration.wait(job)
    assert done.output.task_status == "SUCCEEDED", done
    assert ds.images("team-a", "wan2.6-t2i") == 3
    again = ImageGeneration.fetch(job)  # a later poll never counts again
    assert again.output.task_status == "SUCCEEDED"
    assert ds.images("team-a", "wan2.6-t2i") == 3


def test_image_synthesis_call_fetch_once(ds: Gateway) -> None:
    rsp = ImageSynthesis.call(model="qwen-image-plus", prompt="a lighthouse", size="1328*1328")
    assert rsp.status_code == 200 and rsp.output.task_status == "SUCCEEDED", rsp
    assert rsp.output.results[0].url.startswith("http")
    assert ds.images("team-a", "qwen-image-plus") == 1
    for _ in range(3):
        assert ImageSynthesis.fetch(rsp.output.task_id).output.task_status == "SUCCEEDED"
    assert ds.images("team-a", "qwen-image-plus") == 1
    rsp = ImageSynthesis.call(model="wan2.2-t2i-flash", prompt="a boat", n=2, size="1024*1024")
    assert rsp.status_code == 200 and len(rsp.output.results) == 2
    assert ds.images("team-a", "wan2.2-t2i-flash") == 2


def test_sync_call_text2image_counts_once(ds: Gateway) -> None:
    rsp = ImageSynthesis.sync_call(model="wan2.2-t2i-flash", prompt="a kite", n=1, size="1024*1024")
    assert rsp.status_code == 200 and rsp.output.task_status == "SUCCEEDED", rsp
    assert ds.images("team-a", "wan2.2-t2i-flash") == 1
    ImageSynthesis.fetch(rsp.output.task_id)
    assert ds.images("team-a", "wan2.2-t2i-flash") == 1


def test_cancel_list_and_failed_task(ds: Gateway) -> None:
    job = ImageSynthesis.async_call(model="wan2.2-t2i-plus", prompt="a cat", n=1)
    assert job.status_code == 200
    cancel = ImageSynthesis.cancel(job)
    assert cancel.status_code == 200, cancel
    assert ImageSynthesis.fetch(job).output.task_status == "CANCELED"
    failing = ImageSynthesis.async_call(model="wan2.2-t2i-plus", prompt="x [sim:fail]", n=1)
    result = ImageSynthesis.wait(failing)
    assert result.output.task_status == "FAILED"
    listed = ImageSynthesis.list(page_no=1, page_size=10)
    assert listed.status_code == 200, listed
    ids = {t["task_id"] for t in listed.output["data"]}
    assert ids == {job.output.task_id, failing.output.task_id}
    assert ds.images("team-a", "wan2.2-t2i-plus") == 0  # neither canceled nor failed counts
    late = ImageSynthesis.cancel(failing)  # not PENDING any more
    assert late.status_code == 400 and late.code == "UnsupportedOperation"


def test_tasks_are_private_to_their_key(ds: Gateway, sim: Live) -> None:
    job = ImageSynthesis.async_call(model="qwen-image-plus", prompt="mine", size="1328*1328")
    task_id = job.output.task_id
    other = ImageSynthesis.fetch(task_id, api_key=KEY_B)
    assert other.status_code == 200 and other.output.task_status == "UNKNOWN"
    requests.delete(sim.url + "/_sim/requests", timeout=5)
    denied = ImageSynthesis.cancel(task_id, api_key=KEY_B)
    assert denied.status_code == 400 and denied.code == "UnsupportedOperation"
    assert sim_requests(sim) == []  # neither reached DashScope
    assert ImageSynthesis.list(api_key=KEY_B).output["total"] == 0
    # The owner completes it; a poll by the other key never meters it for anyone.
    assert ImageSynthesis.wait(job).output.task_status == "SUCCEEDED"
    assert ds.images("team-a", "qwen-image-plus") == 1
    assert ds.images("team-b", "qwen-image-plus") == 0


def test_task_survives_gateway_restart(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = start_gateway()
    monkeypatch.setattr(dashscope, "base_http_api_url", first.api)
    job = ImageSynthesis.async_call(
        model="qwen-image-plus", prompt="persist", size="1328*1328", api_key=KEY_A
    )
    assert job.status_code == 200
    port = first.live.port
    start_gateway.stop(first)
    second = start_gateway(port=port)  # same port, same state file
    assert ImageSynthesis.wait(job, api_key=KEY_A).output.task_status == "SUCCEEDED"
    assert second.images("team-a", "qwen-image-plus") == 1
    assert ImageSynthesis.fetch(job, api_key=KEY_B).output.task_status == "UNKNOWN"
    ImageSynthesis.fetch(job, api_key=KEY_A)
    assert second.images("team-a", "qwen-image-plus") == 1


def test_auth_and_allowlist(ds: Gateway) -> None:
    bad = MultiModalConversation.call(
        model="qwen-image-2.0", messages=msgs("x"), api_key="sk-not-a-gateway-key"
    )
    assert bad.status_code == 401 and bad.code == "InvalidApiKey"
    denied = ImageSynthesis.async_call(model="wan2.2-t2i-flash", prompt="x", api_key=KEY_B)
    assert denied.status_code == 403 and denied.code == "AccessDenied"
    assert "wan2.2-t2i-flash" in denied.message
    assert (
        ds.metric(
            "dashscope_proxy_requests_total",
            route="text2image",
            key="team-b",
            model="wan2.2-t2i-flash",
            code="403",
        )
        == 1
    )
    with pytest.raises(dashscope.common.error.InvalidTask):
        ImageSynthesis.call(model="wan2.2-t2i-flash", prompt="x", api_key=KEY_B)


def _png(path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 8 for _ in range(8))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_local_file_upload_through_gateway(ds: Gateway, sim: Live, tmp_path: Path) -> None:
    img = tmp_path / "ref.png"
    _png(img)
    rsp = ImageGeneration.call(
        model="wan2.6-image",
        n=1,
        messages=[Message(role="user", content=[{"text": "make it blue"}, {"image": str(img)}])],
    )
    assert rsp.status_code == 200, rsp
    gen = [r for r in sim_requests(sim) if r["path"].endswith("/generation")][-1]
    content = gen["body"]["input"]["messages"][0]["content"]
    assert any(str(c.get("image", "")).startswith("oss://") for c in content)
    assert ds.images("team-a", "wan2.6-image") == 1


def test_secrets_never_leak(ds: Gateway) -> None:
    MultiModalConversation.call(model="qwen-image-2.0", messages=msgs("hello"))
    MultiModalConversation.call(model="qwen-image-2.0", messages=msgs("x"), api_key="bad-key-1")
    text = requests.get(ds.url + "/metrics", timeout=5).text
    logs = ds.access.getvalue().decode()
    for secret in (UPSTREAM_KEY, KEY_A, "bad-key-1", "hello"):
        assert secret not in text and secret not in logs
    assert 'key="team-a"' in text and '"key":"team-a"' in logs


def test_headers_forwarded_and_hop_by_hop_dropped(ds: Gateway, sim: Live) -> None:
    requests.delete(sim.url + "/_sim/requests", timeout=5)
    r = requests.post(
        ds.api + "/services/aigc/text2image/image-synthesis",
        json={
            "model": "qwen-image-plus",
            "input": {"prompt": "hdr"},
            "parameters": {"size": "1328*1328"},
        },
        headers={
            "Authorization": f"Bearer {KEY_A}",
            "X-DashScope-Async": "enable",
            "X-DashScope-WorkSpace": "ws-1",
            "X-DashScope-DataInspection": "enable",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret-hop",
            "Proxy-Authorization": "Basic cHJveHk=",
            "Cookie": "session=abc",
            "X-Forwarded-For": "10.1.2.3",
        },
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["output"]["task_status"] == "PENDING"
    seen = {k.lower(): v for k, v in sim_requests(sim)[-1]["headers"].items()}
    assert seen["x-dashscope-async"] == "enable"
    assert seen["x-dashscope-workspace"] == "ws-1"
    assert seen["x-dashscope-datainspection"] == "enable"
    for dropped in ("x-hop", "proxy-authorization", "cookie", "x-forwarded-for"):
        assert dropped not in seen, dropped
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_sse_is_relayed_event_by_event(
    start_gateway: GatewayFactory, sim: Live, loop_thread: object
) -> None:
    gw = start_gateway()
    body = {
        "model": "wan2.6-image",
        "input": {"messages": [{"role": "user", "content": [{"text": "steps"}]}]},
        "parameters": {"enable_interleave": True, "max_images": 3, "size": "1280*1280"},
    }
    t0 = time.monotonic()
    arrivals: list[float] = []
    with requests.post(
        gw.api + "/services/aigc/multimodal-generation/generation",
        json=body,
        headers={
            "Authorization": f"Bearer {KEY_A}",
            "X-DashScope-SSE": "enable",
            "Accept": "text/event-stream",
        },
        stream=True,
        timeout=20,
    ) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 4
    # The simulator paces events; had the gateway buffered the stream, every event
    # would arrive at the very end together.
    assert arrivals[-1] - arrivals[0] > 0.1, arrivals
    assert gw.images("team-a", "wan2.6-image") == 3


def test_v2_client_images(ds: Gateway) -> None:
    """The dashscope 2.x client (httpx) works through the gateway too."""
    from dashscope.v2 import Client
    from dashscope.v2.errors import AuthenticationError

    client = Client(api_key=KEY_A, base_url=ds.api, max_retries=0)
    job = client.images.generate(model="wan2.6-t2i", prompt="a cat", size="1280x1280", n=1)
    assert job.status == "SUCCEEDED" and job.image_urls
    job = client.images.generate(
        model="qwen-image-plus", prompt="a dog", size="1328x1328", poll_interval=0.2
    )
    assert job.status == "SUCCEEDED" and len(job.image_urls) == 1
    assert ds.images("team-a", "wan2.6-t2i") == 1
    assert ds.images("team-a", "qwen-image-plus") == 1
    bad = Client(api_key="not-a-gateway-key", base_url=ds.api, max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.images.generate(model="wan2.6-t2i", prompt="x", n=1)
