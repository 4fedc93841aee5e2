"""The pure parts of `storage:` (config, names, links, rewriting) and the local backend's
files, retention sweep and outage behaviour, without a gateway."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import pytest

from proxy.config import ConfigError, StorageConfig, parse_config
from proxy.jsonutil import dumps, loads
from proxy.ops.reload import restart_required
from proxy.storage.backend import StorageUnavailable
from proxy.storage.links import link, origin, signature, verify
from proxy.storage.local import LocalBackend
from proxy.storage.names import inline_image, is_name, url_name
from proxy.storage.rewrite import event_refs, image_refs, rewrite_events, rewrite_json

BASE = """
upstreams: [{name: a, base_url: "http://127.0.0.1:1/api/v1", api_key: sk-upstream-key}]
keys: [{name: team-a, key: gw-team-a-secret-0001}]
"""
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
SECRET = "a-signing-key-of-some-length"


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + text, environ or {})
    return err.value.problems


def test_storage_section_parses_with_secrets_from_the_environment() -> None:
    config = parse_config(
        BASE + "storage: {path: /var/images, signing_key: '${IMAGE_LINK_SECRET}'}\n",
        {"IMAGE_LINK_SECRET": SECRET},
    )
    assert config.storage == StorageConfig(path="/var/images", signing_key=SECRET)
    assert SECRET not in repr(config.storage)
    assert parse_config(BASE, {}).storage is None


def test_storage_problems_are_all_reported_and_never_echo_secrets() -> None:
    found = problems(
        "storage: {backend: s4, link_ttl_seconds: 0, retention_days: -1, max_image_bytes: 0,"
        " public_base_url: 'ftp://x', extra: 1}\n"
    )
    joined = "\n".join(found)
    for where in (
        "storage.backend",
        "storage.link_ttl_seconds",
        "storage.retention_days",
        "storage.max_image_bytes",
        "storage.public_base_url",
        "storage.extra: unknown field",
    ):
        assert where in joined, joined
    assert any("storage.bucket: is required" in p for p in problems("storage: {backend: s3}\n"))
    assert any("storage.signing_key: is required" in p for p in problems("storage: {}\n"))
    short = problems("storage: {signing_key: tooshort}\n")
    assert any("at least 16" in p for p in short) and "tooshort" not in "\n".join(short)
    typed = problems("storage: {signing_key: 12345678901234567890}\n")
    assert "12345678901234567890" not in "\n".join(typed)
    pair = problems(f"storage: {{signing_key: {SECRET}, access_key_id: AKIAEXAMPLE}}\n")
    assert any("secret_access_key" in p for p in pair) and "AKIAEXAMPLE" not in "\n".join(pair)
    # A public base URL needs no signing key.
    ok = parse_config(BASE + "storage: {public_base_url: 'https://cdn.example.com/i/'}\n", {})
    assert ok.storage is not None and ok.storage.public_base_url == "https://cdn.example.com/i"


def test_reload_names_storage_changes_that_need_a_restart() -> None:
    on = parse_config(BASE + f"storage: {{signing_key: {SECRET}, path: /a}}\n", {})
    moved = parse_config(BASE + f"storage: {{signing_key: {SECRET}, path: /b}}\n", {})
    longer = parse_config(
        BASE + f"storage: {{signing_key: {SECRET}, path: /a, link_ttl_seconds: 60}}\n", {}
    )
    off = parse_config(BASE, {})
    assert restart_required(on, moved) == ["storage.path: '/a' -> '/b'"]
    assert restart_required(on, longer) == []  # link parameters follow a reload
    assert restart_required(off, on) == ["storage: turned on (images are kept from the next start)"]
    assert restart_required(on, off) == []


def test_names_are_stable_secret_and_strict() -> None:
    a = url_name(SECRET, "https://x.oss.aliyuncs.com/1/abc.png?Expires=1&Signature=s")
    b = url_name(SECRET, "https://x.oss.aliyuncs.com/1/abc.png?Expires=2&Signature=t")
    assert a == b and is_name(a) and a.endswith(".png")
    assert url_name("another-signing-key!!", "https://x.oss.aliyuncs.com/1/abc.png") != a
    assert url_name(SECRET, "https://x.oss.aliyuncs.com/1/abc.jpeg").endswith(".jpg")
    assert "abc" not in a
    for bad in ("../etc/passwd", a.upper(), a + "/", "x" + a, a.replace(".png", ".exe"), ""):
        assert not is_name(bad), bad


def test_inline_images_are_recognised_by_their_bytes() -> None:
    raw = base64.b64encode(PNG).decode()
    data_url = inline_image("data:image/png;base64," + raw, 10_000)
    bare = inline_image(raw, 10_000)
    assert data_url is not None and bare is not None and data_url.name == bare.name
    assert data_url.data == PNG and data_url.content_type == "image/png"
    assert inline_image(raw, 100) is None  # larger than max_image_bytes
    assert inline_image(base64.b64encode(b"not an image at all" * 10).decode(), 10_000) is None
    assert inline_image("a short word", 10_000) is None
    assert inline_image("data:image/png;base64,!!!", 10_000) is None


def test_links_sign_expire_and_compare() -> None:
    config = StorageConfig(signing_key=SECRET, link_ttl_seconds=60)
    now = 1_700_000_000.0
    url = link(config, "https://gw.example.com", "n.png", now)
    assert url == (
        f"https://gw.example.com/images/n.png?expires=1700000060"
        f"&signature={signature(SECRET, 'n.png', 1700000060)}"
    )
    sig = signature(SECRET, "n.png", 1700000060)
    assert verify(SECRET, "n.png", "1700000060", sig, now)
    assert not verify(SECRET, "n.png", "1700000060", sig, now + 61)  # expired
    assert not verify(SECRET, "m.png", "1700000060", sig, now)  # another name
    assert not verify(SECRET, "n.png", "1700000061", sig, now)  # extended
    assert not verify("", "n.png", "1700000060", sig, now)
    assert not verify(SECRET, "n.png", "-1", sig, now)
    public = StorageConfig(public_base_url="https://cdn.example.com/i")
    assert link(public, "https://gw", "n.png", now) == "https://cdn.example.com/i/n.png"


def test_origin_follows_forwarded_headers_but_only_hosts() -> None:
    assert origin("http", "gw:8080", {}) == "http://gw:8080"
    fwd = {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "img.example.com, gw"}
    assert origin("http", "gw:8080", fwd) == "https://img.example.com"
    evil = {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": 'a"b/c?d'}
    assert origin("http", "gw:8080", evil) == "http://gw:8080"


def test_rewriting_replaces_only_the_images() -> None:
    body = (
        b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant",'
        b'"content":[{"image":"https://x/a.png?s=1"},{"text":"https://x/a.png?s=1 "}]}}]},'
        b'"usage":{"image_count":1},"request_id":"r"}'
    )
    obj = loads(body)
    assert image_refs(obj) == ["https://x/a.png?s=1"]
    out = rewrite_json(body, obj, {"https://x/a.png?s=1": "https://gw/images/n.png?e=1"})
    assert out == body.replace(b'"https://x/a.png?s=1"', b'"https://gw/images/n.png?e=1"')
    assert b"https://x/a.png?s=1 " in out  # text items are left alone
    results = {"output": {"results": [{"url": "https://x/b.png"}, {"code": "DataInspection"}]}}
    assert image_refs(results) == ["https://x/b.png"]
    # Escaped differently from ours: re-encoded, same content.
    escaped = b'{"output":{"results":[{"url":"https:\\/\\/x\\/b.png"}]}}'
    again = rewrite_json(escaped, loads(escaped), {"https://x/b.png": "L"})
    assert loads(again) == {"output": {"results": [{"url": "L"}]}}


def test_sse_blocks_are_rewritten_event_by_event() -> None:
    event = {"output": {"choices": [{"message": {"content": [{"image": "https://x/c.png"}]}}]}}
    block = b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:" + dumps(event) + b"\n\n"
    block += b"id:2\nevent:result\ndata:" + dumps({"output": {"finished": True}}) + b"\n\n"
    payloads = event_refs(block)
    assert len(payloads) == 1
    out = rewrite_events(block, payloads, {"https://x/c.png": "https://gw/images/c.png"})
    assert out == block.replace(b"https://x/c.png", b"https://gw/images/c.png")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_local_backend_stores_atomically_reads_ranges_and_sweeps(tmp_path: Path) -> None:
    backend = LocalBackend(StorageConfig(path=str(tmp_path / "images"), signing_key=SECRET))
    name = "a" * 48 + ".png"
    old_name = "b" * 48 + ".png"

    async def scenario() -> None:
        await backend.open()
        assert await backend.stat(name) is None
        for n in (name, old_name):
            source = backend.spool_dir / f"{n}.part"
            source.write_bytes(PNG)
            obj = await backend.put(n, str(source), "image/png")
            assert obj.size == len(PNG) and not source.exists()
        part = b"".join([c async for c in backend.read(name, 2, 9)])
        assert part == PNG[2:10]
        assert b"".join([c async for c in backend.read(name)]) == PNG
        old = time.time() - 40 * 86400
        os.utime(backend.objects / old_name[:2] / old_name, (old, old))
        assert await backend.sweep(time.time() - 30 * 86400, 10) == 1
        assert await backend.stat(old_name) is None and await backend.stat(name) is not None
        with pytest.raises(StorageUnavailable):
            await backend.stat("../../etc/passwd")
        await backend.check()
        # An outage: the directory replaced by a file is an error, never a crash.
        os.rename(backend.root, tmp_path / "gone")
        backend.root.write_bytes(b"x")
        with pytest.raises(StorageUnavailable):
            await backend.stat(name)
        with pytest.raises(StorageUnavailable):
            await backend.check()

    run(scenario())


def test_sweeps_are_bounded(tmp_path: Path) -> None:
    backend = LocalBackend(StorageConfig(path=str(tmp_path / "images"), signing_key=SECRET))

    async def scenario() -> None:
        await backend.open()
        old = time.time() - 40 * 86400
        for i in range(5):
            n = f"{i:048x}.png"
            (backend.objects / n[:2]).mkdir(exist_ok=True)
            path = backend.objects / n[:2] / n
            path.write_bytes(PNG)
            os.utime(path, (old, old))
        assert await backend.sweep(time.time(), 2) == 2
        assert await backend.sweep(time.time(), 10) == 3

    run(scenario())
