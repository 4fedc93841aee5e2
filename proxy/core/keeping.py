"""Handing out the gateway's own image links: the storage pipeline wired to requests.

What the front ends call once DashScope's answer is settled (counted, tasks recorded):

- `AnswerRewriter` (`rewriter_for(request)`): for the answers `upstream.relay` passes
  through (`/api/v1` generations and task polls, `/aliyun/v1`), every image in a
  JSON answer or an SSE event replaced by its link, everything else byte for byte;
- `keep_images(request, refs)`: for `/v1`, which builds its own answers: per image its
  link (or None: DashScope's URL stays).

An image that could not be kept keeps DashScope's URL and the answer carries
`X-DashScope-Proxy-Storage: degraded` (in an SSE stream, whose headers are already
sent, only the URL and `dashscope_proxy_storage_errors_total` show it). Storage never
changes a count: it runs after settlement, and a failure here is never an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.config.model import StorageConfig
from proxy.jsonutil import loads
from proxy.runtime import RUNTIME
from proxy.storage.backend import StorageUnavailable
from proxy.storage.keeper import KEEPER, Keeper
from proxy.storage.links import link, origin
from proxy.storage.rewrite import event_refs, image_refs, rewrite_events, rewrite_json
from proxy.upstream.fetch import FetchPolicy
from proxy.upstream.rewriting import STORAGE_HEADER

log = logging.getLogger(__name__)
DEGRADED = web.RequestKey("storage_degraded", bool)


@dataclass(frozen=True, slots=True)
class KeptImage:
    name: str
    link: str


def _active(request: web.Request) -> tuple[Keeper, StorageConfig] | None:
    keeper = request.app.get(KEEPER)
    config = request.app[RUNTIME].current.config.storage
    if keeper is None or config is None:
        return None  # off (or turned off by a reload)
    return keeper, config


def policy_for(request: web.Request, config: StorageConfig) -> FetchPolicy:
    """The `b64_json` fetch policy (allowed hosts, timeout) with storage's size cap."""
    rt = request.app[RUNTIME].current.config
    base = FetchPolicy.build(rt.openai.image_fetch, rt.upstreams)
    return FetchPolicy(base.host_globs, config.max_image_bytes, base.timeout_seconds)


async def keep_images(request: web.Request, refs: Sequence[str]) -> list[KeptImage | None] | None:
    """Per image its stored copy's link, or None where DashScope's URL must stay (the
    request is then marked degraded). None when storage is off."""
    active = _active(request)
    if active is None:
        return None
    keeper, config = active
    outcomes = await keeper.keep(refs, policy_for(request, config))
    base = origin(request.scheme, request.host, request.headers)
    now = time.time()
    out: list[KeptImage | None] = []
    for outcome in outcomes:
        if outcome.obj is None:
            request[DEGRADED] = True
            out.append(None)
        else:
            out.append(KeptImage(outcome.obj.name, link(config, base, outcome.obj.name, now)))
    return out


async def read_kept(request: web.Request, name: str, max_bytes: int) -> bytes | None:
    """The bytes of a kept image (for `b64_json`), or None when the store fails now."""
    active = _active(request)
    if active is None:
        return None
    keeper = active[0]
    try:
        obj = await keeper.backend.stat(name)
        if obj is None or obj.size > max_bytes:
            return None
        return b"".join([chunk async for chunk in keeper.backend.read(name)])
    except StorageUnavailable as exc:
        keeper.metrics.error("store")
        log.warning("reading a kept image back failed (%s): fetching it from DashScope", exc.reason)
        return None


def storage_headers(request: web.Request) -> dict[str, str]:
    """`X-DashScope-Proxy-Storage: degraded` when an image of this answer was not kept."""
    return {STORAGE_HEADER: "degraded"} if request.get(DEGRADED) else {}


async def _links(request: web.Request, refs: list[str]) -> dict[str, str]:
    kept = await keep_images(request, refs)
    if kept is None:
        return {}  # turned off by a reload meanwhile
    return {ref: k.link for ref, k in zip(refs, kept, strict=True) if k is not None}


class AnswerRewriter:
    """`upstream.relay.Rewriter` for one request: JSON answers and SSE events."""

    def __init__(self, request: web.Request) -> None:
        self.request = request

    async def body(self, body: bytes) -> tuple[bytes, bool]:
        try:
            obj: Any = loads(body)
        except (ValueError, RecursionError):
            return body, False
        refs = image_refs(obj)
        if not refs:
            return body, False
        links = await _links(self.request, refs)
        return rewrite_json(body, obj, links), len(links) < len(refs)

    async def event(self, block: bytes) -> bytes:
        payloads = event_refs(block)
        if not payloads:
            return block
        refs = list(dict.fromkeys(ref for _, obj in payloads for ref in image_refs(obj)))
        return rewrite_events(block, payloads, await _links(self.request, refs))


def rewriter_for(request: web.Request) -> AnswerRewriter | None:
    return AnswerRewriter(request) if _active(request) is not None else None
