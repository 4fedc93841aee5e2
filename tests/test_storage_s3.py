"""The `s3` storage backend against a real S3-compatible server (moto's, over a socket).

The backend contract (put, stat, read by range, missing objects, prefix, a second replica),
bounded memory for large uploads, an outage that fails fast and recovers, and failures that
name no secret.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import requests

from proxy.storage.backend import StorageUnavailable
from proxy.storage.s3 import CALL_TIMEOUT, CHUNK, S3Backend
from tests.s3_support import BUCKET, MotoServer, moto_server  # noqa: F401 - the fixture

MiB = 1024 * 1024


def image_name(seed: str, ext: str = "png") -> str:
    """A name of the shape the gateway gives stored images (48 hex digits + extension)."""
    return hashlib.sha256(seed.encode()).hexdigest()[:48] + "." + ext


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    """A file of `size` pseudo-random bytes, written in 1 MiB blocks; its first MiB."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[: min(left, MiB)])
            left -= min(left, MiB)
    return block


async def read_all(backend: S3Backend, name: str, start: int = 0, end: int | None = None) -> bytes:
    chunks = [chunk async for chunk in backend.read(name, start, end)]
    assert all(0 < len(c) <= CHUNK for c in chunks)
    return b"".join(chunks)


@pytest.fixture
async def backend(moto_server: MotoServer) -> AsyncIterator[S3Backend]:  # noqa: F811
    store = S3Backend(moto_server.storage_config(prefix="gw/"))
    await store.open()
    yield store
    await store.close()


def peak_rss_reset() -> None:
    """Reset this process's peak resident size (Linux: VmHWM) to its current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------ the contract


async def test_put_then_stat_then_read_whole_and_ranges(
    backend: S3Backend,
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = os.urandom(200_000)  # several 64 KiB chunks
    source = tmp_path / "incoming.png"
    source.write_bytes(data)
    name = image_name("roundtrip")
    before = time.time()

    stored = await backend.put(name, str(source), "image/png")

    assert not source.exists()  # put consumes its source
    assert (stored.name, stored.size, stored.content_type) == (name, len(data), "image/png")
    assert stored.etag == hashlib.md5(data).hexdigest()  # noqa: S324 - S3's ETag
    seen = await backend.stat(name)
    assert seen is not None
    assert (seen.name, seen.size, seen.etag, seen.content_type) == (
        name,
        len(data),
        hashlib.md5(data).hexdigest(),  # noqa: S324
        "image/png",
    )
    assert not seen.etag.startswith('"')
    # S3 keeps whole seconds; moto's clock is this machine's.
    assert before - 2 <= seen.stored_at <= time.time() + 1
    assert await read_all(backend, name) == data
    for start, end in [(0, 0), (10, 99), (65_530, 65_545), (70_000, None), (199_999, 199_999)]:
        want = data[start:] if end is None else data[start : end + 1]
        assert await read_all(backend, name, start, end) == want, (start, end)
    # The object is where an operator looks for it: bucket, prefix + name, content type.
    client = moto_server.client()
    try:
        head = client.head_object(Bucket=BUCKET, Key="gw/" + name)
    finally:
        client.close()
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "image/png"


async def test_a_missing_object_is_none_and_reading_it_is_unavailable(backend: S3Backend) -> None:
    name = image_name("never-stored")
    assert await backend.stat(name) is None
    with pytest.raises(StorageUnavailable) as caught:
        await read_all(backend, name)
    assert caught.value.reason == "missing"


async def test_the_prefix_is_honoured(moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    name = image_name("prefixed")
    source = tmp_path / "a.webp"
    source.write_bytes(b"RIFF....WEBP" * 100)
    one = S3Backend(moto_server.storage_config(prefix="team-one/"))
    other = S3Backend(moto_server.storage_config(prefix="team-two/"))
    await one.open()
    await other.open()
    try:
        await one.put(name, str(source), "image/webp")
        assert (await one.stat(name)) is not None
        assert await other.stat(name) is None  # another prefix is another store
    finally:
        await one.close()
        await other.close()
    client = moto_server.client()
    try:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    finally:
        client.close()
    assert "team-one/" + name in keys
    assert name not in keys and "team-two/" + name not in keys


async def test_a_second_replica_sees_the_same_object(
    backend: S3Backend,
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = os.urandom(5000)
    source = tmp_path / "b.jpg"
    source.write_bytes(data)
    name = image_name("replica", "jpg")
    stored = await backend.put(name, str(source), "image/jpeg")

    replica = S3Backend(moto_server.storage_config(prefix="gw/"))
    await replica.open()
    try:
        seen = await replica.stat(name)
        assert seen is not None and seen.etag == stored.etag and seen.size == len(data)
        assert await read_all(replica, name, 100, 199) == data[100:200]
    finally:
        await replica.close()


async def test_sweep_deletes_nothing_the_lifecycle_rule_does(
    backend: S3Backend, tmp_path: Path
) -> None:
    source = tmp_path / "c.png"
    source.write_bytes(b"\x89PNG" + b"x" * 100)
    name = image_name("kept")
    await backend.put(name, str(source), "image/png")
    assert await backend.sweep(older_than=time.time() + 3600, limit=1000) == 0
    assert await backend.stat(name) is not None


async def test_many_puts_at_once_all_land(backend: S3Backend, tmp_path: Path) -> None:
    # More puts than the upload bound: the rest wait their turn, none fails.
    names = [image_name(f"many-{i}") for i in range(40)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * 10_000)
    stored = await asyncio.gather(
        *(backend.put(name, str(tmp_path / name), "image/png") for name in names)
    )
    assert [s.name for s in stored] == names
    for i, name in enumerate(names):
        assert await read_all(backend, name, 0, 9) == bytes([i]) * 10


# ------------------------------------------------------------------ bounded memory


@pytest.mark.parametrize("multipart", [False, True], ids=["one-put", "multipart"])
async def test_a_large_put_does_not_hold_the_file_in_memory(
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
    multipart: bool,
) -> None:
    size = 20 * MiB
    source = tmp_path / "large.png"
    first_mib = write_file(source, size, seed=7)
    # Multipart: 8 MiB threshold and 5 MiB parts (S3's smallest), so 4 parts.
    options = {"multipart_threshold": 8 * MiB, "part_size": 5 * MiB} if multipart else {}
    store = S3Backend(moto_server.storage_config(prefix="large/"), **options)  # type: ignore[arg-type]
    await store.open()
    try:
        name = image_name(f"large-{multipart}")
        peak_rss_reset()
        base = current_rss()
        stored = await store.put(name, str(source), "image/png")
        growth = peak_rss() - base
        # Streamed, the growth is about 1 MiB; a part or the file read whole would show.
        assert growth < size // 4, f"peak RSS grew by {growth / MiB:.1f} MiB for a 20 MiB file"
        assert stored.size == size
        assert stored.etag.endswith("-4") == multipart  # S3's multipart ETag: md5-<parts>
        seen = await store.stat(name)
        assert seen is not None and seen.size == size
        assert await read_all(store, name, 0, MiB - 1) == first_mib[:MiB]
        assert await read_all(store, name, size - 100) == first_mib[MiB - 100 : MiB]
    finally:
        await store.close()


# ------------------------------------------------------------------ outages


async def test_an_outage_fails_fast_and_the_same_backend_recovers(
    backend: S3Backend,
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    name = image_name("outage")
    source = tmp_path / "d.png"
    moto_server.stop()
    try:
        for call in (
            lambda: backend.check(),
            lambda: backend.stat(name),
            lambda: read_all(backend, name),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as caught:
                await call()
            assert time.monotonic() - started < 10
            assert caught.value.reason == "unreachable"
            assert str(moto_server.port) not in str(caught.value)
        source.write_bytes(b"x" * 1000)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            await backend.put(name, str(source), "image/png")
        assert time.monotonic() - started < 10
        assert caught.value.reason == "unreachable"
        assert not source.exists()  # consumed even when the store refused it
    finally:
        moto_server.restart()  # empty again: moto keeps objects in memory

    await backend.check()
    source.write_bytes(b"y" * 1000)
    stored = await backend.put(name, str(source), "image/png")
    assert stored.size == 1000
    assert await read_all(backend, name) == b"y" * 1000


async def test_a_store_that_never_answers_times_out_within_the_deadline(
    moto_server: MotoServer,  # noqa: F811
) -> None:
    # A listening socket nobody accepts from: connections open, no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = S3Backend(moto_server.storage_config(endpoint_url=endpoint))
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            await store.open()
        elapsed = time.monotonic() - started
        await store.close()
    assert caught.value.reason == "timeout"
    assert elapsed < CALL_TIMEOUT + 2


async def test_a_missing_bucket_is_named_as_such(moto_server: MotoServer) -> None:  # noqa: F811
    store = S3Backend(moto_server.storage_config(bucket="no-such-bucket"))
    with pytest.raises(StorageUnavailable) as caught:
        await store.open()
    await store.close()
    assert caught.value.reason == "no_bucket"


async def test_wrong_credentials_are_refused_without_naming_any_secret(
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # moto checks signatures once its authentication is switched on; the user it checks
    # against is created first, with a policy that allows S3.
    iam = moto_server.client("iam")
    try:
        iam.create_user(UserName="gateway")
        iam.put_user_policy(
            UserName="gateway",
            PolicyName="s3",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
        )
        key = iam.create_access_key(UserName="gateway")["AccessKey"]
    finally:
        iam.close()
    wrong_secret = "wrong-" + key["SecretAccessKey"][6:]
    requests.post(moto_server.endpoint + "/moto-api/reset-auth", data=b"0", timeout=5)
    try:
        right = S3Backend(
            moto_server.storage_config(
                access_key_id=key["AccessKeyId"], secret_access_key=key["SecretAccessKey"]
            )
        )
        await right.open()  # the same user, signing right, is let in
        await right.close()
        for access_key_id, secret in [
            (key["AccessKeyId"], wrong_secret),
            ("AKIANOSUCHKEY0000000", key["SecretAccessKey"]),
        ]:
            wrong = S3Backend(
                moto_server.storage_config(access_key_id=access_key_id, secret_access_key=secret)
            )
            source = tmp_path / "e.png"
            source.write_bytes(b"z" * 100)
            put = functools.partial(wrong.put, image_name("denied"), str(source), "image/png")
            for call in (wrong.open, put):
                with pytest.raises(StorageUnavailable) as caught:
                    await call()
                assert caught.value.reason == "denied"
                text = f"{caught.value} {caught.value!r} {caught.value.reason}"
                for secret_part in (key["SecretAccessKey"], wrong_secret, access_key_id):
                    assert secret_part not in text
                assert moto_server.endpoint not in text
                assert caught.value.__cause__ is None and caught.value.__suppress_context__
            await wrong.close()
    finally:
        requests.post(moto_server.endpoint + "/moto-api/reset-auth", data=b"inf", timeout=5)


def test_without_aiobotocore_the_error_says_which_extra_to_install() -> None:
    # A fresh interpreter where aiobotocore cannot be imported (as without the extra).
    code = (
        "import sys; sys.modules['aiobotocore'] = None; sys.modules['aiobotocore.session'] = None\n"
        "from proxy.config.model import StorageConfig\n"
        "from proxy.storage.s3 import S3Backend\n"
        "try:\n"
        "    S3Backend(StorageConfig(backend='s3', bucket='b'))\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    ).stdout
    assert out.startswith("S3ExtraMissing ")
    assert "pip install 'dashscope-proxy[s3]'" in out


@pytest.mark.parametrize(
    ("endpoint", "url_start"),
    [
        # MinIO and Ceph: path-style, no wildcard DNS name needed.
        ("http://minio.storage.svc:9000", "http://minio.storage.svc:9000/images/gw/"),
        ("https://rgw.example.internal", "https://rgw.example.internal/images/gw/"),
        # OSS serves only virtual-hosted style.
        (
            "https://s3.oss-cn-hangzhou.aliyuncs.com",
            "https://images.s3.oss-cn-hangzhou.aliyuncs.com/gw/",
        ),
    ],
)
async def test_objects_are_addressed_as_each_store_expects(
    moto_server: MotoServer,  # noqa: F811
    endpoint: str,
    url_start: str,
) -> None:
    # A presigned URL is computed by the client itself, without a request: it shows the
    # address every call of the backend's client goes to.
    store = S3Backend(moto_server.storage_config(bucket="images", endpoint_url=endpoint))
    client = await store._create_client()
    try:
        url = await client.generate_presigned_url(
            "get_object", Params={"Bucket": "images", "Key": "gw/" + image_name("where")}
        )
    finally:
        await store.close()
    assert url.startswith(url_start + image_name("where") + "?"), url
