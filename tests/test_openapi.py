"""docs/openapi.yaml stays true: valid OpenAPI 3.1, every route of the app is in it and every
path in it is a route, and `GET /openapi.json` serves exactly it."""

from __future__ import annotations

from pathlib import Path

import requests
import yaml
from aiohttp import web
from openapi_spec_validator import validate

from proxy.app import create_app
from proxy.config import parse_config
from proxy.fronts.ops import load_document
from tests.conftest import Gateway

DOCS = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
CONFIG = """
upstreams: [{name: a, base_url: "http://127.0.0.1:1/api/v1", api_key: sk-upstream-key}]
keys: [{name: t, key: gw-test-key-0001}]
"""


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    ops = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # added by aiohttp for every GET
            continue
        if route.method == "*":  # the last route: answers 404 and 405 in the dialect
            continue
        # `/api/v1/tasks{slash}` is one resource for `/tasks` and `/tasks/`.
        path = route.resource.canonical.replace("{slash}", "") if route.resource else ""
        ops.add((route.method.lower(), path))
    return ops


def doc_operations(doc: dict[str, object]) -> set[tuple[str, str]]:
    paths = doc["paths"]
    assert isinstance(paths, dict)
    return {(method, path) for path, item in paths.items() for method in item if method in METHODS}


def test_document_is_valid_openapi_31() -> None:
    doc = load_document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    # docs/openapi.yaml is the document the package serves (a link to proxy/openapi.yaml).
    assert yaml.safe_load(DOCS.read_text()) == doc
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for m, op in item.items()
        if m in METHODS
    ]
    assert len(ids) == len(set(ids))


def test_every_route_is_documented_and_vice_versa() -> None:
    app = create_app(parse_config(CONFIG, {}))
    in_app, in_doc = app_operations(app), doc_operations(load_document())
    assert in_app - in_doc == set(), "routes missing from docs/openapi.yaml"
    assert in_doc - in_app == set(), "documented paths the app does not serve"


def test_generation_endpoints_document_throttling() -> None:
    doc = load_document()
    for method, path in doc_operations(doc):
        if method == "post" and ("/services/" in path or "/images/" in path):
            responses = doc["paths"][path][method]["responses"]
            assert {"429", "503"} <= set(responses), path


def test_served_at_openapi_json(gateway: Gateway) -> None:
    r = requests.get(gateway.url + "/openapi.json", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.json() == load_document()
