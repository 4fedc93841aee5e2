"""`GET /openapi.json`: the OpenAPI 3.1 document of the gateway's own endpoints.

The document is `proxy/openapi.yaml` (shipped in the package; `docs/openapi.yaml`
links to it), read and converted to JSON on first request, then served from
memory (per app). `tests/test_openapi.py` keeps it true: every route of the app is in it
and every path in it is a route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

import yaml
from aiohttp import web

from proxy.jsonutil import dumps

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_document() -> dict[str, object]:
    """The parsed OpenAPI document."""
    text = resources.files("proxy").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError("proxy/openapi.yaml is not a mapping")
    return doc


def handler() -> Handler:
    """The `/openapi.json` handler of one app: the document is read on first use and kept."""
    cache: list[bytes] = []

    async def serve(request: web.Request) -> web.Response:
        if not cache:
            cache.append(dumps(load_document()))
        return web.Response(body=cache[0], content_type="application/json")

    return serve
