"""Turning bodies into HTTP responses: JSON, SSE streams, DashScope errors, and the
transport-level faults (`truncate`, `badjson`, `pad`, `sse-error`).

The only module that writes response bytes; handlers build bodies with `responses.py` and hand
them here.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .errors import FAULT_ERRORS, ApiError
from .faults import Faults
from .responses import Body, dumps, error_body, pad_body, sse_frame
from .state import REQUEST_ID, STREAMING

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream;charset=UTF-8"
# What `[sim:badjson]` sends: the start of a plausible body, cut inside a string.
BAD_JSON_BODY = b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assist'


def error_response(request: web.Request, error: ApiError) -> web.Response:
    """A DashScope error: JSON, or a single `event:error` frame when the caller streams."""
    body = error_body(request.get(REQUEST_ID, ""), error)
    if request.get(STREAMING, False):
        frame = sse_frame(1, body, event="error", status=error.status)
        return web.Response(status=error.status, body=frame, headers={"Content-Type": SSE_TYPE})
    return web.Response(status=error.status, body=dumps(body), headers={"Content-Type": JSON_TYPE})


async def _truncated(request: web.Request, payload: bytes, content_type: str) -> web.StreamResponse:
    """Promise the whole body, send half of it, then drop the connection."""
    response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


async def json_response(
    request: web.Request, body: Body, faults: Faults, *, status: int = 200
) -> web.StreamResponse:
    """A JSON answer, with the body faults applied."""
    if faults.badjson:
        return web.Response(status=status, body=BAD_JSON_BODY, headers={"Content-Type": JSON_TYPE})
    payload = dumps(pad_body(body, faults.pad))
    if faults.truncate:
        return await _truncated(request, payload, JSON_TYPE)
    return web.Response(status=status, body=payload, headers={"Content-Type": JSON_TYPE})


def _progress_chunk(first: Body) -> Body:
    """A non-final chunk to put before an `sse-error` frame when the answer is one event."""
    return {
        "output": {
            "choices": [{"finish_reason": "null", "message": {"role": "assistant", "content": []}}],
            "finished": False,
        },
        "request_id": first.get("request_id", ""),
    }


async def sse_response(
    request: web.Request, chunks: list[Body], faults: Faults, delay: float
) -> web.StreamResponse:
    """Stream `chunks` as DashScope SSE events, `delay` seconds apart, faults applied."""
    if faults.sse_error and len(chunks) < 2:
        chunks = [_progress_chunk(chunks[0]), *chunks]
    if faults.pad and chunks:
        chunks = [*chunks[:-1], pad_body(chunks[-1], faults.pad)]
    frames = [sse_frame(i, chunk) for i, chunk in enumerate(chunks, start=1)]
    if faults.sse_error:
        error = FAULT_ERRORS[faults.sse_error]
        body = error_body(request[REQUEST_ID], error)
        frames = [frames[0], sse_frame(2, body, event="error", status=error.status)]
    if faults.badjson:
        frames[-1] = frames[-1].split(b"data:", 1)[0] + b"data:" + BAD_JSON_BODY + b"\n\n"
    if faults.truncate:
        return await _truncated_stream(request, b"".join(frames))
    response = web.StreamResponse(
        status=200, headers={"Content-Type": SSE_TYPE, "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for position, frame in enumerate(frames):
        if position and delay:
            await asyncio.sleep(delay)
        await response.write(frame)
    await response.write_eof()
    return response


async def _truncated_stream(request: web.Request, payload: bytes) -> web.StreamResponse:
    """Start the stream (chunked), send half of it and drop the connection mid-chunk."""
    response = web.StreamResponse(status=200, headers={"Content-Type": SSE_TYPE})
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.close()
    return response
