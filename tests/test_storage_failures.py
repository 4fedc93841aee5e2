"""When an image cannot be kept the client still gets it and it is still counted: DashScope's
URL stays, `X-DashScope-Proxy-Storage: degraded`, `dashscope_proxy_storage_errors_total`.
A crafted result URL is never fetched; a storage outage costs no time beyond the fetch timeout.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from aiohttp import web

from proxy.simulator import SimSettings, create_sim_app
from tests.conftest import KEY_A, Gateway, GatewayFactory, gateway_yaml
from tests.storage_support import (
    ImageHost,
    broken_host,  # noqa: F401 - a fixture
    errors,
    is_link,
    storage_yaml,
    stored,
)
from tests.support import Live, LoopThread

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def generate(gw: Gateway, prompt: str = "a bell", n: int = 1) -> requests.Response:
    return requests.post(
        gw.url + PATH,
        json={
            "model": "qwen-image-2.0",
            "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
            "parameters": {"n": n},
        },
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )


def urls_of(rsp: requests.Response) -> list[str]:
    return [c["message"]["content"][0]["image"] for c in rsp.json()["output"]["choices"]]


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def behind(
    start_gateway: GatewayFactory, loop_thread: LoopThread, tmp_path: Path
) -> Iterator[Callable[[str, str], Gateway]]:
    """Starts a gateway in front of a simulator whose result URLs point at `image_base`."""
    sims: list[Live] = []

    def start(image_base: str, extra: str) -> Gateway:
        sim = loop_thread.serve(create_sim_app(SimSettings(public_base_url=image_base)))
        sims.append(sim)
        return start_gateway(yaml_text=gateway_yaml(sim.url, tmp_path / "state.db", extra))

    yield start
    start_gateway.close()
    for sim in sims:
        loop_thread.stop(sim)


def test_a_broken_original_is_degraded_but_counted(
    behind: Callable[[str, str], Gateway],
    images_dir: Path,
    broken_host: ImageHost,  # noqa: F811
) -> None:
    gw = behind(broken_host.live.url, storage_yaml(images_dir))
    rsp = generate(gw, n=2)
    assert rsp.status_code == 200
    assert rsp.headers["X-DashScope-Proxy-Storage"] == "degraded"
    urls = urls_of(rsp)
    assert all(u.startswith(broken_host.live.url + "/_sim/images/") for u in urls), urls
    assert len(broken_host.hits) == 2  # tried, and failed
    assert gw.images("team-a", "qwen-image-2.0") == 2
    assert errors(gw, "status") == 2 and stored(gw) == 0


@pytest.fixture
def other_host(loop_thread: LoopThread) -> Iterator[ImageHost]:
    """A server on 127.0.0.2, a host that is no upstream's (it would answer an image)."""
    hits: list[str] = []

    async def any_path(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"0" * 64, content_type="image/png")

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_path)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.2", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = loop_thread.run(start())
    yield ImageHost(Live(runner.app, runner, port), hits)
    loop_thread.run(runner.cleanup())


def test_a_crafted_result_url_is_never_fetched(
    behind: Callable[[str, str], Gateway], images_dir: Path, other_host: ImageHost
) -> None:
    base = f"http://127.0.0.2:{other_host.live.port}"
    gw = behind(base, storage_yaml(images_dir))
    rsp = generate(gw)
    assert rsp.status_code == 200
    assert rsp.headers["X-DashScope-Proxy-Storage"] == "degraded"
    assert urls_of(rsp)[0].startswith(base)  # the client still gets its image's URL
    assert other_host.hits == []  # the gateway never asked that host
    assert errors(gw, "host") == 1 and stored(gw) == 0
    assert gw.images("team-a", "qwen-image-2.0") == 1


def test_a_storage_outage_degrades_without_delay(
    start_gateway: GatewayFactory, images_dir: Path
) -> None:
    extra = storage_yaml(images_dir) + "openai:\n  image_fetch:\n    timeout_seconds: 2\n"
    gw = start_gateway(extra=extra)
    kept = urls_of(generate(gw))[0]
    assert is_link(gw, kept)
    # The volume goes away: the directory is replaced by a file.
    shutil.rmtree(images_dir)
    images_dir.write_bytes(b"not a directory")
    started = time.monotonic()
    rsp = generate(gw, "during the outage")
    elapsed = time.monotonic() - started
    assert rsp.status_code == 200 and rsp.headers["X-DashScope-Proxy-Storage"] == "degraded"
    url = urls_of(rsp)[0]
    assert not is_link(gw, url) and requests.get(url, timeout=5).content.startswith(b"\x89PNG")
    assert elapsed < 2.0  # well within the fetch timeout
    assert gw.images("team-a", "qwen-image-2.0") == 2
    assert errors(gw, "store") == 1
    assert requests.get(kept, timeout=5).status_code == 503  # the store is down, not the link
    ready = requests.get(gw.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert any(d.startswith("storage (local)") for d in ready.json()["degraded"]), ready.json()
    # The volume comes back: storing works again, with no restart.
    images_dir.unlink()
    rsp = generate(gw, "after the outage")
    assert "X-DashScope-Proxy-Storage" not in rsp.headers, rsp.headers
    assert requests.get(gw.url + "/readyz", timeout=5).json()["status"] == "ready"
    assert is_link(gw, urls_of(rsp)[0])


def test_sse_events_keep_dashscopes_url_when_the_original_is_broken(
    behind: Callable[[str, str], Gateway],
    images_dir: Path,
    broken_host: ImageHost,  # noqa: F811
) -> None:
    gw = behind(broken_host.live.url, storage_yaml(images_dir))
    rsp = requests.post(
        gw.url + PATH,
        json={
            "model": "qwen-image-2.0",
            "input": {"messages": [{"role": "user", "content": [{"text": "a stream"}]}]},
        },
        headers={"Authorization": f"Bearer {KEY_A}", "X-DashScope-SSE": "enable"},
        timeout=30,
    )
    assert rsp.status_code == 200 and "text/event-stream" in rsp.headers["Content-Type"]
    assert broken_host.live.url + "/_sim/images/" in rsp.text  # DashScope's URL, unchanged
    assert "/images/" not in rsp.text.replace("/_sim/images/", "")
    assert gw.images("team-a", "qwen-image-2.0") == 1
    assert errors(gw, "status") == 1


@pytest.fixture
def chunked_upstream(loop_thread: LoopThread) -> Iterator[Live]:
    """A DashScope stand-in whose JSON answers carry no Content-Length (chunked)."""

    async def generation(request: web.Request) -> web.StreamResponse:
        image = f"http://127.0.0.1:{request.url.port}/result/{time.monotonic_ns()}.png"
        body = {
            "output": {
                "choices": [{"message": {"role": "assistant", "content": [{"image": image}]}}]
            },
            "usage": {"image_count": 1},
            "request_id": "r-1",
        }
        out = web.StreamResponse(headers={"Content-Type": "application/json"})
        out.enable_chunked_encoding()
        await out.prepare(request)
        text = json.dumps(body).encode()
        await out.write(text[:40])
        await out.write(text[40:])
        await out.write_eof()
        return out

    async def result(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"\0" * 100, content_type="image/png")

    async def task(request: web.Request) -> web.Response:
        return web.json_response({"output": {"task_status": "UNKNOWN"}, "request_id": "p"})

    app = web.Application()
    app.router.add_post("/api/v1/services/aigc/multimodal-generation/generation", generation)
    app.router.add_get("/result/{name}", result)
    app.router.add_get("/api/v1/tasks/{task_id}", task)
    live = loop_thread.serve(app)
    yield live
    loop_thread.stop(live)


def test_an_answer_without_a_length_is_read_whole_and_rewritten(
    start_gateway: GatewayFactory, chunked_upstream: Live, images_dir: Path, tmp_path: Path
) -> None:
    gw = start_gateway(
        yaml_text=gateway_yaml(
            chunked_upstream.url, tmp_path / "state.db", storage_yaml(images_dir)
        )
    )
    rsp = generate(gw)
    assert rsp.status_code == 200 and "X-DashScope-Proxy-Storage" not in rsp.headers
    url = urls_of(rsp)[0]
    assert is_link(gw, url), url
    assert requests.get(url, timeout=5).content.startswith(b"\x89PNG")
    assert gw.images("team-a", "qwen-image-2.0") == 1


def test_a_redirect_to_a_foreign_host_is_not_followed(
    behind: Callable[[str, str], Gateway],
    loop_thread: LoopThread,
    images_dir: Path,
    other_host: ImageHost,
) -> None:
    target = f"http://127.0.0.2:{other_host.live.port}/latest/meta-data"

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    redirector = loop_thread.serve(app)  # on 127.0.0.1: an allowed host
    try:
        gw = behind(redirector.url, storage_yaml(images_dir))
        rsp = generate(gw)
        assert rsp.status_code == 200
        assert rsp.headers["X-DashScope-Proxy-Storage"] == "degraded"
        assert other_host.hits == []  # the hop to a foreign host was checked, and refused
        assert errors(gw, "host") == 1 and stored(gw) == 0
    finally:
        loop_thread.stop(redirector)
