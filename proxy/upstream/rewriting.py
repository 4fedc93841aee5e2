"""The hook through which `storage:` rewrites the answers `upstream.relay` passes through.

`Rewriter` is what the relay is given (by `core.keeping`) for a 200 answer on an image
route: whole JSON answers (read whole up to `REWRITE_LIMIT`, also when DashScope sends no
length) and SSE events, in blocks of complete events (`sse_cut`). A rewriter that fails
leaves the answer as DashScope sent it, marked `X-DashScope-Proxy-Storage: degraded`
where headers can still say so. Deliberately not here: what is rewritten and how
(`proxy.storage`), which only the layers above the relay may know.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

# Set on an answer some of whose images keep DashScope's URL (`storage:` failed them).
STORAGE_HEADER = "X-DashScope-Proxy-Storage"
# With a rewriter, a JSON answer up to this size (inline base64 images) is read whole.
REWRITE_LIMIT = 64 * 1024 * 1024


class Rewriter(Protocol):
    """Replaces the images of a successful answer with the gateway's links (`storage:`,
    supplied by `core.keeping`). Runs after settlement; never raises."""

    async def body(self, body: bytes) -> tuple[bytes, bool]:
        """The rewritten JSON answer, and whether an image kept DashScope's URL."""

    async def event(self, block: bytes) -> bytes:
        """A block of complete SSE events, rewritten."""


async def rewrite_body(rewriter: Rewriter, out: web.Response, body: bytes) -> None:
    try:
        new, degraded = await rewriter.body(body)
    except Exception:
        log.exception("storing the images of an answer failed; relaying DashScope's URLs")
        new, degraded = body, True
    if new is not body:
        out.body = new
    if degraded:
        out.headers[STORAGE_HEADER] = "degraded"


async def read_upto(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body, and True; or, once it passes `limit` bytes, what was read and False."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False
    return b"".join(chunks), True


async def chunks_after(resp: aiohttp.ClientResponse, prefix: bytes) -> AsyncIterator[bytes]:
    """`prefix` (already read), then the rest of the body as the socket delivers it."""
    if prefix:
        yield prefix
    async for chunk in resp.content.iter_any():
        yield chunk


def sse_cut(buffer: bytes | bytearray) -> int:
    """Pure: where the complete events at the start of `buffer` end (0: none yet)."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


async def rewrite_event(rewriter: Rewriter | None, block: bytes) -> bytes:
    if rewriter is None or not block:
        return block
    try:
        return await rewriter.event(block)
    except Exception:
        log.exception("storing the images of an SSE event failed; relaying DashScope's URLs")
        return block
