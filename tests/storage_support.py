"""Test support for `storage:`: configs, links, and a stand-in image host on a socket."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from aiohttp import web

from tests.conftest import Gateway
from tests.support import Live, LoopThread

SIGNING_KEY = "test-image-link-secret-0123456789"
LINK = re.compile(
    r"^http://127\.0\.0\.1:\d+/images/[0-9a-f]{48}\.png\?expires=\d+&signature=[0-9a-f]{64}$"
)


def storage_yaml(root: Path, **fields: object) -> str:
    """A `storage:` section (local backend in `root`), for `start_gateway(extra=...)`."""
    lines = ["storage:", "  backend: local", f"  path: {root}", f"  signing_key: {SIGNING_KEY}"]
    lines += [f"  {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def is_link(gw: Gateway, url: str) -> bool:
    return url.startswith(gw.url + "/images/") and LINK.match(url) is not None


def name_of(url: str) -> str:
    return urlsplit(url).path.rpartition("/")[2]


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file())


def stored(gw: Gateway) -> float:
    return gw.metric("dashscope_proxy_stored_images_total", backend="local")


def errors(gw: Gateway, reason: str) -> float:
    return gw.metric("dashscope_proxy_storage_errors_total", backend="local", reason=reason)


def expire_originals(sim: Live) -> None:
    assert requests.post(sim.url + "/_sim/expire-images", timeout=5).status_code == 200


def image_fetches(sim: Live) -> int:
    """How many result images the simulator served (its `/_sim/images` route)."""
    stats: dict[str, Any] = requests.get(sim.url + "/_sim/stats", timeout=5).json()
    return sum(v for k, v in stats.get("requests_by_path", {}).items() if "/_sim/images" in k)


@dataclass
class ImageHost:
    """An HTTP server that answers every path with `status`, counting what it is asked."""

    live: Live
    hits: list[str] = field(default_factory=list)


@pytest.fixture
def broken_host(loop_thread: LoopThread) -> Iterator[ImageHost]:
    hits: list[str] = []

    async def any_path(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=500, text="broken")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    live = loop_thread.serve(app)
    yield ImageHost(live, hits)
    loop_thread.stop(live)
