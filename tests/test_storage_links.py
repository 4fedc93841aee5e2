"""`GET /images/{name}`: what browsers and download tools expect, and links that refuse
what they must (tampered, expired, unknown, past retention), across a restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from proxy.storage.links import signature
from tests.conftest import KEY_A, Gateway, GatewayFactory
from tests.storage_support import (
    SIGNING_KEY,
    is_link,
    name_of,
    query_of,
    storage_yaml,
    stored_files,
)

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def gw(start_gateway: GatewayFactory, images_dir: Path) -> Gateway:
    return start_gateway(extra=storage_yaml(images_dir))


def generate(gw: Gateway, prompt: str = "a bell") -> str:
    rsp = requests.post(
        gw.url + PATH,
        json={
            "model": "qwen-image-2.0",
            "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
        },
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=10,
    )
    assert rsp.status_code == 200, rsp.text
    url: str = rsp.json()["output"]["choices"][0]["message"]["content"][0]["image"]
    assert is_link(gw, url), url
    return url


def signed(gw: Gateway, name: str, expires: int) -> str:
    sig = signature(SIGNING_KEY, name, expires)
    return f"{gw.url}/images/{name}?expires={expires}&signature={sig}"


def test_headers_head_ranges_and_revalidation(gw: Gateway) -> None:
    url = generate(gw)
    full = requests.get(url, timeout=5)
    body = full.content
    assert full.status_code == 200 and body.startswith(b"\x89PNG")
    assert full.headers["Content-Type"] == "image/png"
    assert int(full.headers["Content-Length"]) == len(body)
    assert full.headers["Accept-Ranges"] == "bytes"
    etag = full.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    cache = full.headers["Cache-Control"]
    assert "immutable" in cache and int(cache.split("max-age=")[1].split(",")[0]) > 86400

    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(body)) and head.headers["ETag"] == etag

    part = requests.get(url, headers={"Range": "bytes=0-7"}, timeout=5)
    assert part.status_code == 206 and part.content == body[:8]
    assert part.headers["Content-Range"] == f"bytes 0-7/{len(body)}"
    tail = requests.get(url, headers={"Range": "bytes=-10"}, timeout=5)
    assert tail.status_code == 206 and tail.content == body[-10:]
    rest = requests.get(url, headers={"Range": "bytes=100-"}, timeout=5)
    assert rest.status_code == 206 and rest.content == body[100:]
    beyond = requests.get(url, headers={"Range": f"bytes={len(body)}-"}, timeout=5)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(body)}"

    same = requests.get(url, headers={"If-None-Match": etag}, timeout=5)
    assert same.status_code == 304 and same.content == b""


def test_tampered_and_expired_signatures_are_refused(gw: Gateway) -> None:
    url = generate(gw)
    name, query = name_of(url), query_of(url)
    sig = query["signature"]
    tampered = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert requests.get(url.replace(sig, tampered), timeout=5).status_code == 403
    longer = url.replace(f"expires={query['expires']}", f"expires={int(query['expires']) + 60}")
    assert requests.get(longer, timeout=5).status_code == 403  # extending a link breaks it
    past = int(time.time()) - 5
    expired = requests.get(signed(gw, name, past), timeout=5)
    assert expired.status_code == 403 and expired.json()["code"] == "AccessDenied"
    assert requests.get(f"{gw.url}/images/{name}", timeout=5).status_code == 403  # unsigned
    # A wrong signature is 403 whatever the name: names cannot be probed.
    unknown = "0" * 48 + ".png"
    assert requests.get(url.replace(name, unknown), timeout=5).status_code == 403
    # A valid link to an image not kept is 404.
    assert requests.get(signed(gw, unknown, int(time.time()) + 60), timeout=5).status_code == 404


def test_names_cannot_leave_the_store(gw: Gateway, images_dir: Path) -> None:
    generate(gw)
    secret = images_dir / "outside.png"
    secret.write_bytes(b"\x89PNG not an image of ours")
    for name in ("..", "../outside.png", "..%2Foutside.png", "outside.png", "objects"):
        got = requests.get(signed(gw, name, int(time.time()) + 60), timeout=5)
        assert got.status_code in (403, 404), (name, got.status_code)
        assert b"not an image of ours" not in got.content


def test_links_survive_a_restart(start_gateway: GatewayFactory, images_dir: Path) -> None:
    first = start_gateway(extra=storage_yaml(images_dir))
    url = generate(first)
    body = requests.get(url, timeout=5).content
    port = first.live.port
    start_gateway.stop(first)
    second = start_gateway(extra=storage_yaml(images_dir), port=port)
    assert url.startswith(second.url + "/images/")
    again = requests.get(url, timeout=5)
    assert again.status_code == 200 and again.content == body


def test_images_past_retention_are_refused_and_swept(
    start_gateway: GatewayFactory, images_dir: Path
) -> None:
    # retention_days 0.00003 is ~2.6 s: the sweep runs about every second.
    gw = start_gateway(extra=storage_yaml(images_dir, retention_days="0.00003"))
    url = generate(gw)
    assert requests.get(url, timeout=5).status_code == 200
    old = time.time() - 3600
    for path in stored_files(images_dir):
        os.utime(path, (old, old))
    assert requests.get(url, timeout=5).status_code == 404  # refused at once
    deadline = time.time() + 10
    while stored_files(images_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert stored_files(images_dir) == []  # and deleted by the background sweep


def test_public_base_url_links_are_the_base_and_the_name(
    start_gateway: GatewayFactory, images_dir: Path
) -> None:
    extra = storage_yaml(images_dir, public_base_url="https://cdn.example.com/images/")
    gw = start_gateway(extra=extra)
    rsp = requests.post(
        gw.url + PATH,
        json={
            "model": "qwen-image-2.0",
            "input": {"messages": [{"role": "user", "content": [{"text": "a cup"}]}]},
        },
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=10,
    )
    url = rsp.json()["output"]["choices"][0]["message"]["content"][0]["image"]
    assert url.startswith("https://cdn.example.com/images/") and "?" not in url, url
    (stored,) = stored_files(images_dir)
    assert stored.name == name_of(url)  # what the CDN serves from the store
