"""`GET /openapi.json`: the OpenAPI 3.1 document of the gateway's own endpoints.

The document is `proxy/openapi.yaml` (shipped in the package; `docs/openapi.yaml`
links to it), read and converted to JSON on first request, then served from
memory. `tests/test_openapi.py` keeps it true: every route of the app is in it
and every path in it is a route.
"""

from __future__ import annotations

from importlib import resources

import yaml
from aiohttp import web

from .jsonutil import dumps

OPENAPI_JSON = web.AppKey("openapi_json", bytes)


def load_document() -> dict[str, object]:
    """The parsed OpenAPI document."""
    text = resources.files("proxy").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError("proxy/openapi.yaml is not a mapping")
    return doc


async def serve(request: web.Request) -> web.Response:
    body = request.app.get(OPENAPI_JSON)
    if body is None:
        body = dumps(load_document())
        request.app[OPENAPI_JSON] = body
    return web.Response(body=body, content_type="application/json")
