"""Relaying one DashScope response to the client, unchanged, while sniffing what metering needs.

Three shapes:
- small JSON with a Content-Length (the usual answer, a few KB): read whole,
  parsed once for metering, written in one `web.Response`;
- SSE (`text/event-stream`): streamed chunk by chunk as it arrives (never
  buffered whole); `SseSniffer` keeps the last complete event for metering;
- anything else (large or unknown length): streamed with `BodySniffer`.

If the client goes away mid-relay we keep reading the upstream body to its end
(within the upstream timeouts) without writing, because DashScope bills what it
generated and the count must not be lost. If DashScope fails mid-relay after
the response has started, the client connection is closed so the client sees a
truncated body rather than a "complete" corrupt one.

With `storage:` a 200 answer's images are replaced by the gateway's links after
settlement, through the `upstream.rewriting.Rewriter` the caller passes: JSON answers
are then read whole (up to `REWRITE_LIMIT`), SSE events go out in blocks of complete events.

What cannot be counted is counted as such (`answer_lost`): a 2xx generation
answer or task poll that never arrives whole (read timeout, truncated, not
JSON, cut at the end of a drain) may hold images DashScope bills, so it grows
`dashscope_proxy_unmetered_answers_total{reason}` and writes a ledger line with
`"images": null`. Answers with an error status never do: DashScope refused them.
The request's `ANSWER` state says where it stands with DashScope, so the
pipeline (a failure before any answer, a drain cut) records it once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.catalogue import SERVICE_PATHS
from proxy.config.model import UpstreamConfig
from proxy.errors import is_throttling, retry_after_of
from proxy.jsonutil import loads
from proxy.metering import PARSE_LIMIT, BodyFacts, BodySniffer, SseSniffer, parse_facts
from proxy.metrics import Metrics
from proxy.runtime import CTX, METER, TASKS
from proxy.state.tasks import TERMINAL
from proxy.upstream.call import UpstreamFailure, map_client_error, response_headers
from proxy.upstream.rewriting import (
    REWRITE_LIMIT,
    STORAGE_HEADER,
    Rewriter,
    chunks_after,
    read_upto,
    rewrite_body,
    rewrite_event,
    sse_cut,
)

log = logging.getLogger(__name__)

# Read size for streamed bodies: large enough to relay MB/s with few syscalls,
# small enough that thousands of concurrent streams stay within memory.
CHUNK = 64 * 1024

_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, BrokenPipeError)

# Routes whose answers can carry generated images: generations on every front end,
# and task polls. Cancels, lists and upload policies never do.
IMAGE_ROUTES = frozenset(
    {*SERVICE_PATHS, "aliyun.generations", "openai.generations", "openai.edits"}
    | {"tasks.get", "openai.tasks.get"}
)
# Transport failures once the request was sent -> why its answer went uncounted.
# `connect` / `connect_timeout` are absent: nothing reached DashScope.
LOST_REASONS = {
    "timeout": "read_timeout",  # timeouts.read (or .total) ran out
    "truncated": "truncated",
    "disconnected": "truncated",
    "transport": "truncated",
}
# Where a request stands with DashScope: an answer awaited, received whole (and
# settled), or lost (already counted as unmetered). The native path leaves it unset
# until the relay has the whole answer; the pipeline then goes by `ctx.upstream`
# (set once a call is made).
AWAITED, RECEIVED, LOST = "awaited", "received", "lost"
ANSWER = web.RequestKey("upstream_answer", str)
# The gateway itself closed the client connection (DashScope failed mid-relay):
# not a client that went away, so not a 499.
ABORTED = web.RequestKey("aborted_by_gateway", bool)


class Capture:
    """The bytes a streamed answer writes to its client, kept (up to `limit`) for a request
    with an `Idempotency-Key` (`proxy.core.idempotency`): `seal` stores them before the
    client sees the end of the answer, so a client that read it can repeat it at once."""

    def __init__(
        self, limit: int, seal: Callable[[Capture, web.StreamResponse, bool], Awaitable[None]]
    ) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.sealed = False
        self._seal = seal

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= self.limit:
            self.chunks.append(chunk)

    async def seal(self, response: web.StreamResponse, complete: bool) -> None:
        if not self.sealed:
            self.sealed = True
            await self._seal(self, response, complete)


CAPTURE = web.RequestKey("answer_capture", Capture)


def lost_reason(failure: BaseException) -> str | None:
    """Pure: the unmetered reason of a transport failure, None if nothing was sent."""
    return LOST_REASONS.get(failure.kind) if isinstance(failure, UpstreamFailure) else None


async def answer_lost(request: web.Request, reason: str, task_id: str | None = None) -> None:
    """Count, once per request, an answer that could carry images but never arrived whole.

    Only on routes that can carry images; a poll of a task already known final is not
    counted (its images, if any, were counted when it ended). Never raises: this runs
    on paths that are already failing.
    """
    ctx = request.get(CTX)
    if ctx is None or request.get(ANSWER) in (LOST, RECEIVED) or ctx.route not in IMAGE_ROUTES:
        return  # already counted, or an answer that arrived (a refusal among them)
    request[ANSWER] = LOST
    task_id = task_id or request.match_info.get("task_id")
    try:
        if task_id:
            record = await request.app[TASKS].get(task_id)
            if record is not None and record.status in TERMINAL:
                return
        await request.app[METER].unmetered(
            key=ctx.key,
            model=ctx.model,
            route=ctx.route,
            upstream=ctx.upstream,
            request_id=ctx.request_id,
            task_id=task_id,
            reason=reason,
        )
    except Exception:
        log.exception("recording an unmetered answer (request %s) failed", ctx.request_id)


@dataclass(slots=True)
class Relayed:
    """The outcome of one relayed upstream call."""

    response: web.StreamResponse
    status: int
    facts: BodyFacts
    error_code: str | None
    complete: bool  # upstream body fully received
    upstream_request_id: str | None


def _error_code(status: int, facts_body: bytes | None) -> str | None:
    if status < 400:
        return None
    if facts_body:
        try:
            obj = loads(facts_body)
            if isinstance(obj, dict) and isinstance(obj.get("code"), str):
                return obj["code"][:64] if obj["code"] else str(status)
        except (ValueError, RecursionError):
            pass
    return str(status)


Settle = Callable[[Relayed], Awaitable[None]]


async def relay_response(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    metrics: Metrics,
    upstream: UpstreamConfig,
    extra_headers: dict[str, str] | None = None,
    settle: Settle | None = None,
    rewriter: Rewriter | None = None,
) -> Relayed:
    """Relay `resp` to the client; always releases `resp`.

    `settle` (metering, task recording) runs once the upstream body is complete
    and *before* the client receives the end of the response, so a client that
    has read the whole answer can rely on the count being recorded. `rewriter`
    (storage) then replaces the images of a 200 answer: JSON answers up to
    `REWRITE_LIMIT` are read whole for it, SSE events pass through it block by block.
    """
    upstream_rid = resp.headers.get("x-request-id") or resp.headers.get("x-dashscope-request-id")
    try:
        headers = response_headers(resp.headers)
        if extra_headers:
            headers.update(extra_headers)
        ctype = resp.headers.get("Content-Type", "")
        length = resp.content_length
        rewrite = rewriter if resp.status == 200 else None
        whole = PARSE_LIMIT if rewrite is None else REWRITE_LIMIT
        sse = "text/event-stream" in ctype
        # Storage needs the whole answer: one without a length is read up to the bound.
        unsized = rewrite is not None and length is None and not sse
        if not sse and (unsized or (length is not None and length <= whole)):
            try:
                body, done = await read_upto(resp, whole) if unsized else (await resp.read(), True)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = map_client_error(exc)
                metrics.upstream_errors.labels(upstream.name, failure.kind).inc()
                if 200 <= resp.status < 300:
                    await answer_lost(request, lost_reason(failure) or "truncated")
                else:
                    request[ANSWER] = RECEIVED  # DashScope refused it: no image to count
                raise failure from None
            if not done:
                # Larger than storage can hold whole: relayed as it comes, images unkept.
                log.warning("an answer without a length is too large to store its images")
                headers[STORAGE_HEADER] = "degraded"
                return await _stream(
                    request,
                    resp,
                    headers,
                    False,
                    metrics,
                    upstream,
                    upstream_rid,
                    settle,
                    None,
                    body,
                )
            code = _error_code(resp.status, body)
            status, reason = resp.status, resp.reason
            if code:
                metrics.upstream_errors.labels(upstream.name, code).inc()
                if resp.status >= 400 and (resp.status == 429 or is_throttling(code)):
                    # Every Throttling* answer is a 429 with Retry-After, whatever
                    # status it came with, so every client backs off the same way.
                    status, reason = 429, "Too Many Requests"
                    headers["Retry-After"] = str(retry_after_of(resp.headers.get("Retry-After")))
            parsed = parse_facts(body) if resp.status == 200 else BodyFacts()
            out = web.Response(status=status, reason=reason, body=body, headers=headers)
            relayed = Relayed(out, status, parsed or BodyFacts(), code, True, upstream_rid)
            if settle is not None:
                await _settle_safely(settle, relayed, upstream)
            if parsed is None:
                # Relayed unchanged all the same: the client may make more of it.
                await answer_lost(request, "invalid_json")
            else:
                request[ANSWER] = RECEIVED
                if rewrite is not None:
                    await rewrite_body(rewrite, out, body)
            return relayed
        return await _stream(
            request,
            resp,
            headers,
            sse,
            metrics,
            upstream,
            upstream_rid,
            settle,
            rewrite if sse else None,
        )
    finally:
        resp.release()


async def _stream(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    sse: bool,
    metrics: Metrics,
    upstream: UpstreamConfig,
    upstream_rid: str | None,
    settle: Settle | None,
    rewriter: Rewriter | None = None,
    prefix: bytes = b"",
) -> Relayed:
    sniffer: SseSniffer | BodySniffer = SseSniffer() if sse else BodySniffer()
    # Keep an error body's first bytes to learn its DashScope code.
    err_head = bytearray() if resp.status >= 400 else None
    if resp.status == 429:
        headers["Retry-After"] = str(retry_after_of(resp.headers.get("Retry-After")))
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if not sse and resp.content_length is not None:
        # The bytes pass through unchanged (no decompression), so DashScope's
        # length holds: the client gets it instead of chunked framing, and a
        # body cut short upstream shows as truncated (we then close).
        out.content_length = resp.content_length
    client_alive = True
    try:
        await out.prepare(request)
    except _CLIENT_GONE:
        client_alive = False
    complete = False
    failure: UpstreamFailure | None = None
    # With a Content-Length the client has the whole answer once its last byte is
    # written, before `write_eof`: hold each chunk back until the next arrives, so the
    # last one is written only after settling (a client that read the answer can rely
    # on its count). SSE is chunked: its end is `write_eof`, and events go out at once.
    hold = out.content_length is not None
    held: bytes | None = None
    capture = request.get(CAPTURE)
    # With storage, SSE goes out in blocks of complete events, each rewritten.
    pending = bytearray() if rewriter is not None else None
    try:
        # iter_any: each buffer as the socket delivered it (at most the reader's
        # high-water mark), without iter_chunked's re-slicing and joining.
        async for chunk in chunks_after(resp, prefix):
            sniffer.feed(chunk)
            if err_head is not None and len(err_head) < 4096:
                err_head += chunk[: 4096 - len(err_head)]
            if hold:
                chunk, held = held or b"", chunk
            if pending is not None:
                pending += chunk
                cut = sse_cut(pending)
                chunk = await rewrite_event(rewriter, bytes(pending[:cut]))
                del pending[:cut]
            if capture is not None and chunk:
                capture.add(chunk)  # what the client gets (or would, were it still there)
            if client_alive and chunk:
                try:
                    await out.write(chunk)
                except _CLIENT_GONE:
                    # Keep draining: DashScope bills what it generates.
                    client_alive = False
        complete = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        failure = map_client_error(exc)
        metrics.upstream_errors.labels(upstream.name, failure.kind).inc()
        log.warning(
            "upstream %s failed mid-response (%s); closing client connection",
            upstream.name,
            failure.kind,
        )
        client_alive = False  # closed below, once what is lost is on record
    code = _error_code(resp.status, bytes(err_head) if err_head is not None else None)
    if sse and isinstance(sniffer, SseSniffer) and sniffer.error:
        code = code or "stream_error"
    if code:
        metrics.upstream_errors.labels(upstream.name, code).inc()
    facts = sniffer.facts() if resp.status == 200 else BodyFacts()
    relayed = Relayed(out, resp.status, facts, code, complete, upstream_rid)
    if settle is not None:
        await _settle_safely(settle, relayed, upstream)
    if 200 <= resp.status < 300 and facts.image_count is None:
        if failure is not None:
            await answer_lost(request, lost_reason(failure) or "truncated")
        elif sniffer.invalid:
            await answer_lost(request, "invalid_json")
    if request.get(ANSWER) != LOST:
        request[ANSWER] = RECEIVED
    # The answer's last bytes: the chunk held back, or SSE's last (unterminated) block.
    tail = b""
    if complete:
        tail = await rewrite_event(rewriter, bytes(pending)) if pending else held or b""
    if capture is not None:
        if tail:
            capture.add(tail)
        await capture.seal(out, complete)
    if failure is not None:
        _abort(request)
    elif client_alive:
        with contextlib.suppress(*_CLIENT_GONE):
            if tail:
                await out.write(tail)
            await out.write_eof()
    return relayed


async def _settle_safely(settle: Settle, relayed: Relayed, upstream: UpstreamConfig) -> None:
    """Run `settle`; a failure there (a state store error, say) is logged, never turned into
    an error for a client whose answer DashScope already produced and billed."""
    try:
        await settle(relayed)
    except Exception:
        log.exception(
            "settling a response from upstream %s failed (status %s); relaying it anyway",
            upstream.name,
            relayed.status,
        )


def _abort(request: web.Request) -> None:
    request[ABORTED] = True
    transport = request.transport
    if transport is not None:
        transport.close()
