"""Fetching generated images for `response_format: b64_json`.

The URLs come from DashScope's answer, so this is the gateway's one
server-side request forgery surface: a URL is fetched only when its host
matches `openai.image_fetch.allowed_hosts` (DashScope's result hosts under
`*.aliyuncs.com` by default) or is the host of a configured upstream (where
the simulator serves its images). Redirects are followed by hand, at most
`MAX_REDIRECTS` hops, each hop's target checked the same way, so a redirect
can never lead somewhere the policy would not fetch directly. Bodies are read
up to `max_bytes` (more is an error, not a truncated image) within
`timeout_seconds` per image.

The images of one answer are fetched concurrently. Any failure is an error
naming the image (`data[i]`): a client never gets a silently shorter list.

Deliberately not here: deciding the answer shape (`openai_translate.py`) and
metering (the images were generated and billed before any fetch).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import aiohttp
from yarl import URL

from proxy.config.model import ImageFetchConfig, UpstreamConfig
from proxy.errors import fetch_error

# DashScope serves result images directly; a short chain covers CDN hops.
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


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
    """Why one image could not be fetched (a short reason, never the signed URL)."""


async def fetch_all(
    session: aiohttp.ClientSession, urls: Sequence[str], policy: FetchPolicy
) -> list[str]:
    """Every image as base64, in order; a GatewayError naming the first image that failed."""
    results = await asyncio.gather(
        *(_fetch(session, url, policy) for url in urls), return_exceptions=True
    )
    out: list[str] = []
    for i, result in enumerate(results):
        if isinstance(result, FetchFailed):
            raise fetch_error(i, len(urls), str(result))
        if isinstance(result, BaseException):
            raise result
        out.append(base64.b64encode(result).decode("ascii"))
    return out


async def _fetch(session: aiohttp.ClientSession, raw_url: str, policy: FetchPolicy) -> bytes:
    try:
        url = URL(raw_url)
    except (ValueError, TypeError):
        raise FetchFailed("the image URL is not valid") from None
    timeout = aiohttp.ClientTimeout(total=policy.timeout_seconds)
    try:
        async with asyncio.timeout(policy.timeout_seconds):
            for _ in range(MAX_REDIRECTS + 1):
                if not policy.allows(url):
                    raise FetchFailed(f"host {url.host!r} is not an allowed image host")
                async with session.get(
                    url,
                    allow_redirects=False,
                    timeout=timeout,
                    headers={"Accept-Encoding": "identity"},
                ) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        url = url.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status != 200:
                        raise FetchFailed(f"the image host answered HTTP {resp.status}")
                    return await _read_capped(resp, policy.max_bytes)
            raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise FetchFailed(f"timed out after {policy.timeout_seconds:g} s") from None
    except aiohttp.ClientError:
        raise FetchFailed("the connection to the image host failed") from None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise FetchFailed(f"the image is larger than {limit} bytes")
    # The socket's buffers as they come (iter_any: no re-slicing), joined once at
    # the end: one copy of the image instead of a growing bytearray plus bytes().
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FetchFailed(f"the image is larger than {limit} bytes")
    if not size:
        raise FetchFailed("the image is empty")
    return b"".join(chunks)
