"""Handlers of the task endpoints: E5 poll, E6 cancel, E7 list.

All answer HTTP 200 for every task state, UNKNOWN included; a task of another key is answered
exactly like an unknown id. Faults reach these only through the `X-Sim-Fault` header or a
queued fault with `polls: true`.
"""

from __future__ import annotations

import time
from datetime import datetime

from aiohttp import web

from .context import apply_pre_faults, produce, request_faults
from .errors import CANCEL_NOT_PENDING, DATA_INSPECTION_OUTPUT, SimHTTPError, invalid
from .faults import Faults
from .render import json_response
from .responses import (
    CST,
    cancel_body,
    list_body,
    poll_body,
    task_summary,
    unknown_task_body,
)
from .results import Produced
from .state import OWNER, REQUEST_ID, STATE
from .tasks import TERMINAL, CancelResult, TaskStatus

MAX_PAGE_SIZE = 100


async def get_task(request: web.Request) -> web.StreamResponse:
    """E5 `GET /tasks/{task_id}`."""
    state = request.app[STATE]
    faults = request_faults(request, is_poll=True)
    await apply_pre_faults(request, faults)
    task_id = request.match_info["task_id"]
    now = time.monotonic()
    task = state.tasks.get(task_id, request[OWNER], now)
    if task is None:
        return await json_response(request, unknown_task_body(request[REQUEST_ID], task_id), faults)
    status = task.status(now)
    produced = Produced(())
    if status is TaskStatus.SUCCEEDED:
        expires = state.url_expiry(task.end_wall)
        produced = produce(request, task.request, task.seed, task.image_names, task.shape, expires)
        if not task.counted:
            task.counted = True
            state.stats.images_generated += produced.image_count
    body = poll_body(task, status, request[REQUEST_ID], produced, DATA_INSPECTION_OUTPUT)
    if status in TERMINAL and task.pad:
        faults = faults.merge(Faults(pad=task.pad))
    return await json_response(request, body, faults)


async def cancel_task(request: web.Request) -> web.StreamResponse:
    """E6 `POST /tasks/{task_id}/cancel`: only a PENDING task can be cancelled."""
    state = request.app[STATE]
    faults = request_faults(request, is_poll=True)
    await apply_pre_faults(request, faults)
    result = state.tasks.cancel(
        request.match_info["task_id"], request[OWNER], time.monotonic(), time.time()
    )
    if result is not CancelResult.CANCELED:
        # An unknown or foreign id gets the same answer as a started task: ids never leak.
        raise SimHTTPError(CANCEL_NOT_PENDING)
    return await json_response(request, cancel_body(request[REQUEST_ID]), faults)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SimHTTPError(invalid(f"The parameter {name} must be an integer.")) from None
    if not low <= value <= high:
        raise SimHTTPError(invalid(f"The parameter {name} must be between {low} and {high}."))
    return value


def _time_query(request: web.Request, name: str) -> float | None:
    """`start_time`/`end_time` as `YYYYMMDDhhmmss` (UTC+8) -> epoch seconds."""
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        return datetime.strptime(raw, "%Y%m%d%H%M%S").replace(tzinfo=CST).timestamp()
    except ValueError:
        raise SimHTTPError(invalid(f"The parameter {name} must be YYYYMMDDhhmmss.")) from None


async def list_tasks(request: web.Request) -> web.StreamResponse:
    """E7 `GET /tasks?page_no&page_size&model_name&status&start_time&end_time`."""
    state = request.app[STATE]
    faults = request_faults(request, is_poll=True)
    await apply_pre_faults(request, faults)
    page_no = _int_query(request, "page_no", 1, 1, 1_000_000)
    page_size = _int_query(request, "page_size", 10, 1, MAX_PAGE_SIZE)
    status = request.query.get("status") or None
    if status is not None and status.upper() not in TaskStatus.__members__:
        raise SimHTTPError(invalid(f"The parameter status {status!r} is not a task status."))
    now = time.monotonic()
    found = state.tasks.query(
        request[OWNER],
        now,
        model=request.query.get("model_name") or None,
        status=status,
        start_wall=_time_query(request, "start_time"),
        end_wall=_time_query(request, "end_time"),
    )
    page = found[(page_no - 1) * page_size : page_no * page_size]
    entries = [task_summary(task, task.status(now)) for task in page]
    body = list_body(request[REQUEST_ID], entries, len(found), page_no, page_size)
    return await json_response(request, body, faults)
