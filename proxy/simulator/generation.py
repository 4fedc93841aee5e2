"""Handlers of the generation endpoints E1-E4: sync results (JSON or SSE), `sync_call` on
text2image, and async task submission.

The path of a request: faults from header and queue -> JSON -> prompt directives -> pre-answer
faults (slow, error) -> validation -> `oss://` resolution -> answer. Bodies come from
`responses.py`, bytes are written by `render.py`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from .catalogue import SEED_MAX, Endpoint
from .context import (
    INVALID_JSON,
    apply_pre_faults,
    header_enabled,
    parse_json,
    produce,
    request_faults,
)
from .errors import BAD_JSON, DATA_INSPECTION_OUTPUT, INVALID_URL, ApiError, SimHTTPError
from .faults import Faults, faults_in_prompt, prompt_text
from .models import GenRequest, validate
from .render import json_response, sse_response
from .responses import poll_body, submit_body
from .results import Produced, stream_chunks, sync_result
from .signing import image_name
from .state import OWNER, REQUEST_ID, STATE, STREAMING, SimState
from .tasks import Task

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def generation_handler(endpoint: Endpoint) -> Handler:
    """The handler of one generation endpoint."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _generate(request, endpoint)

    return handle


def _wants_stream(endpoint: Endpoint, request: web.Request, body: object) -> bool:
    """SSE on E1 when `X-DashScope-SSE: enable` (any case) or `parameters.stream` is true."""
    if endpoint is not Endpoint.MULTIMODAL:
        return False
    if header_enabled(request, "X-DashScope-SSE"):
        return True
    params = body.get("parameters") if isinstance(body, dict) else None
    return isinstance(params, dict) and params.get("stream") is True


def _check_oss(request: web.Request, state: SimState, req: GenRequest) -> None:
    """`oss://` inputs resolve only with the resolve header and a file we received."""
    for image in req.images:
        if not image.startswith("oss://"):
            continue
        resolve = header_enabled(request, "X-DashScope-OssResourceResolve")
        if not resolve or image.removeprefix("oss://") not in state.uploads:
            raise SimHTTPError(INVALID_URL)


async def _generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    async_header = header_enabled(request, "X-DashScope-Async")
    body = parse_json(await request.read())
    faults = request_faults(request, is_poll=False)
    if body is not INVALID_JSON:
        faults = faults.merge(faults_in_prompt(prompt_text(body)))
    request[STREAMING] = _wants_stream(endpoint, request, body)
    await apply_pre_faults(request, faults)
    if body is INVALID_JSON:
        raise SimHTTPError(BAD_JSON)
    result = validate(endpoint, body, async_header=async_header, sse=request[STREAMING])
    if isinstance(result, ApiError):
        raise SimHTTPError(result)
    _check_oss(request, state, result)
    if endpoint is Endpoint.MULTIMODAL:
        return await _answer_sync(request, state, result, faults)
    if not async_header:  # text2image `sync_call`: the final task shape, at once
        return await _answer_sync_synthesis(request, state, result, faults)
    settings = state.settings
    task = _new_task(
        request,
        state,
        result,
        faults,
        pending=settings.effective_pending,
        running=settings.effective_running,
    )
    return await json_response(request, submit_body(request[REQUEST_ID], task.task_id), faults)


def _seed(req: GenRequest) -> int:
    return req.seed if req.seed is not None else secrets.randbelow(SEED_MAX + 1)


async def _answer_sync(
    request: web.Request, state: SimState, req: GenRequest, faults: Faults
) -> web.StreamResponse:
    if faults.fail:
        raise SimHTTPError(DATA_INSPECTION_OUTPUT)
    if state.settings.effective_sync_delay:
        await asyncio.sleep(state.settings.effective_sync_delay)
    seed = _seed(req)
    names = tuple(image_name(seed, i) for i in range(req.image_count))
    produced = produce(request, req, seed, names, faults.shape, state.url_expiry())
    state.stats.images_generated += produced.image_count
    request_id = request[REQUEST_ID]
    if request[STREAMING]:
        chunks = stream_chunks(req, request_id, produced)
        return await sse_response(request, chunks, faults, state.settings.effective_sse_delay)
    return await json_response(request, sync_result(req, request_id, produced), faults)


def _new_task(
    request: web.Request,
    state: SimState,
    req: GenRequest,
    faults: Faults,
    *,
    pending: float,
    running: float,
) -> Task:
    seed = _seed(req)
    task = Task(
        task_id=str(uuid.uuid4()),
        owner=request[OWNER],
        request=req,
        request_id=request[REQUEST_ID],
        seed=seed,
        image_names=tuple(image_name(seed, i) for i in range(req.image_count)),
        submitted_mono=time.monotonic(),
        submitted_wall=time.time(),
        pending_seconds=pending,
        running_seconds=running,
        fail=faults.fail,
        pad=faults.pad,
        shape=faults.shape,
    )
    state.tasks.add(task, task.submitted_mono)
    state.stats.tasks_created += 1
    return task


async def _answer_sync_synthesis(
    request: web.Request, state: SimState, req: GenRequest, faults: Faults
) -> web.StreamResponse:
    if state.settings.effective_sync_delay:
        await asyncio.sleep(state.settings.effective_sync_delay)
    # The task already ran while the caller waited: it is terminal from the start.
    task = _new_task(request, state, req, faults, pending=0.0, running=0.0)
    status = task.status(task.submitted_mono)
    produced = Produced(())
    if not task.fail:
        expires = state.url_expiry()
        produced = produce(request, req, task.seed, task.image_names, task.shape, expires)
        state.stats.images_generated += produced.image_count
        task.counted = True
    body = poll_body(task, status, request[REQUEST_ID], produced, DATA_INSPECTION_OUTPUT)
    return await json_response(request, body, faults)
