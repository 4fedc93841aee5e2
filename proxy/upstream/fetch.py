"""Fetching generated images: for `response_format: b64_json`, and into files for `storage`.

The URLs come from DashScope's answer, so this is the gateway's one
server-side request forgery surface: a URL is fetched only when its host
matches `openai.image_fetch.allowed_hosts` (DashScope's result hosts under
`*.aliyuncs.com` by default) or is the host of a configured upstream (where
the simulator serves its images). Redirects are followed by hand, at most
`MAX_REDIRECTS` hops, each hop's target checked the same way, so a redirect
can never lead somewhere the policy would not fetch directly. Bodies are read
up to `max_bytes` (more is an error, not a truncated image) within
`timeout_seconds` per image.

`fetch_to_file` streams one image into a file (for `storage`), holding at most
`FILE_BUFFER` bytes of it in memory.

The images of one answer are fetched concurrently. Any failure is an error naming the
image (`data[i]`): a client never gets a silently shorter list.

Deliberately not here: deciding the answer shape (`openai_translate.py`) and
metering (the images were generated and billed before any fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import BinaryIO

import aiohttp
from yarl import URL

from proxy.config.model import ImageFetchConfig, UpstreamConfig
from proxy.errors import fetch_error

# DashScope serves result images directly; a short chain covers CDN hops.
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What a streamed fetch holds in memory before writing it to its file: a few socket
# buffers, so a thousand images in flight hold several hundred MB, not their size
# (`python -m bench --only storage` measures it). Smaller blocks also cost less CPU here:
# with 1 MiB ones the writer thread and the event loop contend for the GIL.
FILE_BUFFER = 128 * 1024
READ_BUFFER = 32 * 1024


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Where images may be fetched from, how much, how long."""

    host_globs: tuple[str, ...]
    max_bytes: int
    timeout_seconds: float

    @classmethod
    def build(cls, config: ImageFetchConfig, upstreams: Iterable[UpstreamConfig]) -> FetchPolicy:
        hosts = tuple(h.lower() for h in config.allowed_hosts)
        own = tuple(u.host.lower() for u in upstreams if u.host)
        return cls(hosts + own, config.max_bytes, config.timeout_seconds)

    def allows(self, url: URL) -> bool:
        """Pure: http(s) and a host matching one of the globs (no userinfo tricks)."""
        if url.scheme not in ("http", "https") or not url.host or url.user is not None:
            return False
        host = url.host.lower().rstrip(".")
        return any(fnmatchcase(host, glob) for glob in self.host_globs)


class FetchFailed(Exception):
    """Why one image could not be fetched (a short reason, never the signed URL).

    `reason` is a closed-set label (`host`, `status`, `too_large`, `timeout`,
    `connection`, `empty`, `invalid_url`, `redirects`, `io`) for the storage metrics."""

    def __init__(self, message: str, reason: str = "fetch") -> None:
        super().__init__(message)
        self.reason = reason


async def fetch_all(
    session: aiohttp.ClientSession, urls: Sequence[str], policy: FetchPolicy
) -> list[bytes]:
    """Every image's bytes, in order; a GatewayError naming the first image that failed."""
    results = await asyncio.gather(
        *(_fetch(session, url, policy) for url in urls), return_exceptions=True
    )
    out: list[bytes] = []
    for i, result in enumerate(results):
        if isinstance(result, FetchFailed):
            raise fetch_error(i, len(urls), str(result))
        if isinstance(result, BaseException):
            raise result
        out.append(result)
    return out


@asynccontextmanager
async def _image_response(
    session: aiohttp.ClientSession, raw_url: str, policy: FetchPolicy
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The image's 200 response, every redirect hop checked against `policy`; the whole
    fetch (body included) within `policy.timeout_seconds`."""
    try:
        url = URL(raw_url)
    except (ValueError, TypeError):
        raise FetchFailed("the image URL is not valid", "invalid_url") from None
    timeout = aiohttp.ClientTimeout(total=policy.timeout_seconds)
    try:
        async with asyncio.timeout(policy.timeout_seconds):
            for _ in range(MAX_REDIRECTS + 1):
                if not policy.allows(url):
                    raise FetchFailed(f"host {url.host!r} is not an allowed image host", "host")
                async with session.get(
                    url,
                    allow_redirects=False,
                    timeout=timeout,
                    headers={"Accept-Encoding": "identity"},
                    # A small reader buffer: the socket is paused sooner, so an image
                    # being fetched holds less of itself in memory.
                    read_bufsize=READ_BUFFER,
                ) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        url = url.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status != 200:
                        raise FetchFailed(f"the image host answered HTTP {resp.status}", "status")
                    if resp.content_length is not None and resp.content_length > policy.max_bytes:
                        raise FetchFailed(
                            f"the image is larger than {policy.max_bytes} bytes", "too_large"
                        )
                    yield resp
                    return
            raise FetchFailed(f"more than {MAX_REDIRECTS} redirects", "redirects")
    except TimeoutError:
        raise FetchFailed(f"timed out after {policy.timeout_seconds:g} s", "timeout") from None
    except aiohttp.ClientError:
        raise FetchFailed("the connection to the image host failed", "connection") from None


async def _fetch(session: aiohttp.ClientSession, raw_url: str, policy: FetchPolicy) -> bytes:
    async with _image_response(session, raw_url, policy) as resp:
        return await _read_capped(resp, policy.max_bytes)


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    # The socket's buffers as they come (iter_any: no re-slicing), joined once at
    # the end: one copy of the image instead of a growing bytearray plus bytes().
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FetchFailed(f"the image is larger than {limit} bytes", "too_large")
    if not size:
        raise FetchFailed("the image is empty", "empty")
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class Fetched:
    """An image streamed into a file: its size, the first bytes (to tell its format) and
    the content type its host declared."""

    size: int
    head: bytes
    content_type: str


async def fetch_to_file(
    session: aiohttp.ClientSession, raw_url: str, policy: FetchPolicy, path: str
) -> Fetched:
    """Stream the image at `raw_url` into the new file `path` (same host rule, redirect
    checks, size cap and timeout as `fetch_all`), never holding more than `FILE_BUFFER`
    bytes of it in memory; file writes run in a worker thread. On failure the file is
    removed and FetchFailed raised."""
    try:
        handle = await asyncio.to_thread(open, path, "xb")
    except OSError:
        raise FetchFailed("the spool directory cannot be written", "io") from None
    try:
        async with _image_response(session, raw_url, policy) as resp:
            size = 0
            head = b""
            pending: list[bytes] = []
            buffered = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FetchFailed(
                        f"the image is larger than {policy.max_bytes} bytes", "too_large"
                    )
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                pending.append(chunk)
                buffered += len(chunk)
                if buffered >= FILE_BUFFER:
                    await _write(handle, pending)
                    pending, buffered = [], 0
            if not size:
                raise FetchFailed("the image is empty", "empty")
            await _write(handle, pending)
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        await asyncio.to_thread(handle.close)
        return Fetched(size, head, ctype)
    except BaseException:
        await asyncio.to_thread(_discard, handle, path)
        raise


async def _write(handle: BinaryIO, chunks: list[bytes]) -> None:
    if not chunks:
        return
    try:
        await asyncio.to_thread(handle.writelines, chunks)
    except OSError:
        raise FetchFailed("the spool file cannot be written", "io") from None


def _discard(handle: BinaryIO, path: str) -> None:
    handle.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
