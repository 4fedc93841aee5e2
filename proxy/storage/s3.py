"""`storage.backend: s3`: images kept in any S3-compatible store (AWS, MinIO, Ceph, OSS).

One aiobotocore client per process (aiohttp underneath, like the gateway), opened once and
reused by every call. Every replica pointed at the same bucket and prefix serves every link.

- **Fail fast.** Connect and read timeouts are short and a call is tried at most twice, and
  each call runs under an overall deadline, so an unreachable store fails a `put` in seconds,
  never minutes; every failure becomes `StorageUnavailable` with a short reason label.
- **Bounded memory.** `put` streams the file from disk as the request body (aiohttp reads it
  in small blocks); above `MULTIPART_THRESHOLD` it is a multipart upload whose parts are
  streamed the same way, one at a time. At most `MAX_UPLOADS` uploads run at once per
  process, the others wait, so a thousand images stored at once never hold a thousand
  files in memory. The body is not hashed into the signature (botocore would read it on
  the event loop); a `Content-MD5`, computed in a worker thread, lets the store check it.
- **No secrets in errors.** botocore's messages can carry the endpoint URL and the request;
  the reasons and messages here are built from the operation, the S3 error code and the
  exception class only, and the original exception is not chained.
- **Retention** is the bucket's lifecycle rule (docs/storage.md): `sweep` deletes nothing and
  the image front refuses links past `retention_days` by `stored_at`.

aiobotocore is imported only here (the `s3` extra); without it, constructing the backend
raises `S3ExtraMissing`. Not here: choosing the backend, names, links, fetching images.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any, BinaryIO, NoReturn

from proxy.config.model import StorageConfig
from proxy.storage.backend import StorageUnavailable, StoredObject
from proxy.storage.names import is_name

CHUNK = 64 * 1024  # the read() contract: chunks of at most 64 KiB
CONNECT_TIMEOUT = 2.0  # seconds: an unreachable store is found out at once, not after 60 s
READ_TIMEOUT = 5.0  # seconds without a byte from a store that accepted the request
ATTEMPTS = 2  # one retry (botocore's standard mode: throttling and 5xx), then give up
CALL_TIMEOUT = 8.0  # seconds for a whole metadata call, retries included
MIN_UPLOAD_RATE = 1024 * 1024  # bytes/s an upload may not fall below: its deadline grows with size
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # larger files go up in parts (a retry resends one part)
PART_SIZE = 8 * 1024 * 1024  # S3's smallest part is 5 MiB, its most parts 10,000
MAX_UPLOADS = 16  # concurrent uploads per process; the rest wait their turn
# The client's pool: the uploads, plus image reads, which hold a connection for as long as
# the client downloading the image takes, plus stats and checks.
MAX_CONNECTIONS = 100

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_DENIED |= {"InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}


class S3ExtraMissing(ImportError):
    """`storage.backend: s3` is configured but aiobotocore is not installed."""


class S3Backend:
    """Objects kept as `prefix + name` in one bucket of an S3-compatible store."""

    kind = "s3"

    def __init__(
        self,
        config: StorageConfig,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        max_uploads: int = MAX_UPLOADS,
    ) -> None:
        try:
            from aiobotocore.session import get_session
        except ImportError as exc:
            raise S3ExtraMissing(
                "storage.backend: s3 needs aiobotocore, which is not installed: "
                "pip install 'dashscope-proxy[s3]'"
            ) from exc
        if not config.bucket:
            raise ValueError("storage.backend: s3 needs storage.bucket")
        self._config = config
        self._bucket: str = config.bucket
        self._prefix = config.prefix
        self._get_session = get_session
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        # Per instance, and there is one instance per process: the process-wide bound.
        self._uploads = asyncio.Semaphore(max_uploads)
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the client (once) and check the bucket. When the check fails the client
        is kept: calls work again as soon as the store is back."""
        if self._client is None:
            self._client = await self._create_client()
        await self.check()

    async def _create_client(self) -> Any:
        from aiobotocore.config import AioConfig

        config = self._config
        # No SHA-256 of the body in the signature: botocore would read the whole file on the
        # event loop (in 1 MiB blocks) before sending it. Each upload carries its Content-MD5
        # instead, computed in a worker thread, which the store checks against what arrived.
        s3_options: dict[str, str | bool] = {"payload_signing_enabled": False}
        if config.endpoint_url:
            # botocore addresses a custom endpoint path-style (`endpoint/bucket/key`), which
            # MinIO and Ceph need without a wildcard DNS name; OSS serves only virtual-hosted
            # style (`bucket.endpoint/key`), so its hosts get that.
            host = config.endpoint_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
            if host == "aliyuncs.com" or host.endswith(".aliyuncs.com"):
                s3_options["addressing_style"] = "virtual"
        client_config = AioConfig(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"total_max_attempts": ATTEMPTS, "mode": "standard"},
            max_pool_connections=MAX_CONNECTIONS,
            s3=s3_options,
            # botocore's default since 1.36 adds CRC32 checksums (and, for streams, chunked
            # trailers) that several S3-compatible stores refuse; only what S3 requires.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        credentials: dict[str, str] = {}
        if config.access_key_id and config.secret_access_key:
            credentials = {
                "aws_access_key_id": config.access_key_id,
                "aws_secret_access_key": config.secret_access_key,
            }
        # Without keys botocore's default chain applies: environment, profile, IAM role.
        stack = AsyncExitStack()
        with _failures("open"):
            client = await stack.enter_async_context(
                self._get_session().create_client(
                    "s3",
                    endpoint_url=config.endpoint_url or None,
                    region_name=config.region or None,
                    config=client_config,
                    **credentials,
                )
            )
        self._stack = stack
        return client

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    def _key(self, name: str) -> str:
        if not is_name(name):  # callers check too; a backend never trusts a name
            raise StorageUnavailable("invalid_name")
        return self._prefix + name

    def _s3(self) -> Any:
        if self._client is None:
            raise StorageUnavailable("closed", "the S3 backend is not open")
        return self._client

    # ------------------------------------------------------------------ objects

    async def check(self) -> None:
        client = self._s3()
        with _failures("check"):
            async with asyncio.timeout(CALL_TIMEOUT):
                await client.head_bucket(Bucket=self._bucket)

    async def stat(self, name: str) -> StoredObject | None:
        client = self._s3()
        with _failures("stat", missing_ok=True) as missing:
            async with asyncio.timeout(CALL_TIMEOUT):
                head = await client.head_object(Bucket=self._bucket, Key=self._key(name))
        if missing.found:
            return None
        return StoredObject(
            name=name,
            size=int(head["ContentLength"]),
            etag=str(head["ETag"]).strip('"'),
            content_type=str(head.get("ContentType") or "application/octet-stream"),
            stored_at=float(head["LastModified"].timestamp()),
        )

    async def put(self, name: str, source: str, content_type: str) -> StoredObject:
        """Upload the file at `source` as `name`, then delete `source` (also when the upload
        failed: the caller keeps DashScope's URL and has nothing to retry from)."""
        try:
            async with self._uploads:
                with _failures("put"):
                    file, size = await asyncio.to_thread(_open_file, source)
                    try:
                        async with asyncio.timeout(CALL_TIMEOUT + size / MIN_UPLOAD_RATE):
                            if size > self._multipart_threshold:
                                etag = await self._put_parts(name, file, size, content_type)
                            else:
                                etag = await self._put_whole(name, file, content_type)
                    finally:
                        file.close()
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.unlink, source)
        return StoredObject(name, size, etag, content_type, time.time())

    async def _put_whole(self, name: str, file: BinaryIO, content_type: str) -> str:
        # A file object body is streamed by aiohttp block by block (and rewound by botocore
        # for a retry); one PUT is atomic for readers.
        digest = await asyncio.to_thread(_content_md5, file)
        answer = await self._s3().put_object(
            Bucket=self._bucket,
            Key=self._key(name),
            Body=file,
            ContentType=content_type,
            ContentMD5=digest,
        )
        return str(answer["ETag"]).strip('"')

    async def _put_parts(self, name: str, file: BinaryIO, size: int, content_type: str) -> str:
        client, key = self._s3(), self._key(name)
        upload = await client.create_multipart_upload(
            Bucket=self._bucket, Key=key, ContentType=content_type
        )
        upload_id = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            for number, offset in enumerate(range(0, size, self._part_size), start=1):
                # Each part is a window on the file, streamed like a whole file: no part
                # is ever read into memory at once.
                window = _Window(file, offset, min(self._part_size, size - offset))
                digest = await asyncio.to_thread(_content_md5, window)
                sent = await client.upload_part(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=window,
                    ContentMD5=digest,
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            done = await client.complete_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Nothing half-written stays billed in the bucket; best effort, bounded.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_TIMEOUT + 1):
                    await client.abort_multipart_upload(
                        Bucket=self._bucket, Key=key, UploadId=upload_id
                    )
            raise
        return str(done["ETag"]).strip('"')

    async def read(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        client = self._s3()
        ranged: dict[str, str] = {}
        if start or end is not None:
            ranged["Range"] = f"bytes={start}-{'' if end is None else end}"
        with _failures("read"):
            async with asyncio.timeout(CALL_TIMEOUT):
                answer = await client.get_object(Bucket=self._bucket, Key=self._key(name), **ranged)
            body = answer["Body"]
            try:
                # Each read waits at most READ_TIMEOUT (the client's socket timeout).
                while chunk := await body.read(CHUNK):
                    yield bytes(chunk)
            finally:
                body.close()

    async def sweep(self, older_than: float, limit: int) -> int:
        # The bucket's lifecycle rule expires objects (docs/storage.md); listing a bucket to
        # delete from it would cost a request per thousand objects on every replica.
        return 0


def _content_md5(file: BinaryIO | io.RawIOBase) -> str:
    """The `Content-MD5` header of a file's bytes from the start (in 64 KiB blocks, so no
    large buffer is ever allocated); the file is left at its start."""
    digest = hashlib.md5(usedforsecurity=False)
    file.seek(0)
    while block := file.read(CHUNK):
        digest.update(block)
    file.seek(0)
    return base64.b64encode(digest.digest()).decode("ascii")


def _open_file(path: str) -> tuple[BinaryIO, int]:
    file = open(path, "rb")  # noqa: SIM115 - closed by put() after the upload
    return file, os.fstat(file.fileno()).st_size


class _Window(io.RawIOBase):
    """`length` bytes of `file` from `offset`, as a seekable file of their own (one part of
    a multipart upload); it has no `fileno`, so nothing sizes it by the whole file."""

    def __init__(self, file: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self._file, self._offset, self._length, self._pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        if size is None or size < 0 or size > left:
            size = left
        self._file.seek(self._offset + self._pos)
        data = self._file.read(size)
        self._pos += len(data)
        return data


class _Missing:
    found = False


@contextlib.contextmanager
def _failures(operation: str, missing_ok: bool = False) -> Iterator[_Missing]:
    """Translate the store's failures (botocore, aiohttp, timeouts, the source file) into
    `StorageUnavailable`; with `missing_ok`, a missing object sets `.found` instead."""
    missing = _Missing()
    try:
        yield missing
    except StorageUnavailable:
        raise
    except Exception as exc:
        code = _error_code(exc)
        if missing_ok and code in _NOT_FOUND:
            missing.found = True
            return
        _raise_unavailable(operation, exc, code)


def _error_code(exc: Exception) -> str | None:
    """The S3 error code of a refusal (`NoSuchKey`, `403`...), None for other failures."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code") or status or "unknown")
    return None


def _raise_unavailable(operation: str, exc: Exception, code: str | None) -> NoReturn:
    import aiohttp
    from botocore import exceptions as boto

    kind = type(exc).__name__
    unreachable: tuple[type[BaseException], ...] = (ConnectionError, aiohttp.ClientConnectionError)
    unreachable += (boto.EndpointConnectionError, boto.ConnectionClosedError)
    if code is not None:
        if code in _DENIED:
            reason = "denied"
        elif code in {"NoSuchBucket"} or (operation == "check" and code in _NOT_FOUND):
            reason = "no_bucket"
        elif code in _NOT_FOUND:
            reason = "missing"
        elif code in {"InvalidRange"}:
            reason = "range"
        elif code.startswith("5") or code in {"SlowDown", "InternalError", "ServiceUnavailable"}:
            reason = "server"
        else:
            reason = "refused"
        raise StorageUnavailable(reason, f"S3 {operation} failed: {code}") from None
    if isinstance(exc, TimeoutError | boto.ConnectTimeoutError | boto.ReadTimeoutError):
        reason = "timeout"
    elif isinstance(exc, unreachable):
        reason = "unreachable"
    elif isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
        reason = "credentials"
    elif isinstance(exc, OSError):
        reason = "io"  # the local source file
    elif isinstance(exc, boto.BotoCoreError | aiohttp.ClientError):
        reason = "error"
    else:
        raise exc  # a bug, not the store: let it be seen
    raise StorageUnavailable(reason, f"S3 {operation} failed: {reason} ({kind})") from None
