"""The keeping pipeline on real sockets, without a gateway: concurrent answers holding the same
image share one fetch, a repeat finds the stored copy, and the size cap holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config import StorageConfig
from proxy.storage.keeper import Keeper
from proxy.storage.local import LocalBackend
from proxy.storage.metrics import StorageMetrics
from proxy.upstream.fetch import FetchPolicy

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


def test_concurrent_answers_share_one_fetch_and_repeats_none(tmp_path: Path) -> None:
    hits: list[str] = []

    async def image(request: web.Request) -> web.Response:
        hits.append(request.path)
        await asyncio.sleep(0.2)  # long enough for the second answer to arrive meanwhile
        return web.Response(body=PNG, content_type="image/png")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/{name}", image)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = StorageConfig(
            path=str(tmp_path / "images"), signing_key="k" * 20, max_image_bytes=len(PNG)
        )
        backend = LocalBackend(config)
        await backend.open()
        registry = CollectorRegistry()
        policy = FetchPolicy(("127.0.0.1",), len(PNG), 5.0)
        url = f"http://127.0.0.1:{port}/a.png?Expires=1&Signature=x"
        again = f"http://127.0.0.1:{port}/a.png?Expires=2&Signature=y"
        async with aiohttp.ClientSession() as session:
            keeper = Keeper(
                config, backend, backend.spool_dir, session, StorageMetrics(registry, "local")
            )
            one, two = await asyncio.gather(
                keeper.keep([url], policy), keeper.keep([again], policy)
            )
            assert one[0].obj is not None and one[0].obj == two[0].obj
            assert hits == ["/a.png"]  # one fetch for both
            (three,) = await keeper.keep([url], policy)
            assert three.obj is not None and three.obj.name == one[0].obj.name
            assert hits == ["/a.png"]  # found in the store: not fetched again
            small = FetchPolicy(("127.0.0.1",), 100, 5.0)
            (big,) = await keeper.keep([f"http://127.0.0.1:{port}/b.png"], small)
            assert big.obj is None and big.reason == "too_large"
        stored = registry.get_sample_value(
            "dashscope_proxy_stored_images_total", {"backend": "local"}
        )
        assert stored == 1
        assert list(backend.spool_dir.iterdir()) == []  # nothing left behind
        await runner.cleanup()

    asyncio.run(scenario())
