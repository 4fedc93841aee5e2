"""DashScope-native passthrough under `/api/v1`: what the official SDKs call.

Every handler is the same straight line: authenticate, read what routing
needs, choose the upstream, swap the key, relay the answer unchanged, then
settle (meter images, record task ownership). Task polls, cancels and lists go
to the upstream that created the task, and only for the key that created it;
anyone else is answered exactly as DashScope answers an unknown id.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import partial

from aiohttp import web

from proxy.catalogue import SERVICE_PATHS
from proxy.config.model import KeyConfig, UpstreamConfig
from proxy.core.admission import admit, task_ended
from proxy.core.idempotency import begin
from proxy.core.idempotency_key import json_fingerprint
from proxy.core.inbound import (
    open_request,
    read_native_request,
    set_model,
    uses_uploads,
    valid_task_id,
)
from proxy.core.keeping import rewriter_for
from proxy.core.limits import requested_images
from proxy.core.settlement import origin, relay_settled, settle_task
from proxy.errors import (
    GatewayError,
    cancel_refused,
    invalid_parameter,
    missing_model,
    no_upstream,
    upstream_unavailable,
)
from proxy.jsonutil import dumps
from proxy.metering import facts_from_bytes
from proxy.runtime import (
    CTX,
    METRICS,
    TASKS,
    RequestContext,
    Routes,
    Runtime,
)
from proxy.state.tasks import TERMINAL, TaskRecord
from proxy.upstream.call import Forwarded, request_headers
from proxy.upstream.failover import UpstreamCall, call_with_failover
from proxy.upstream.pinned import call_pinned
from proxy.upstream.relay import Relayed, relay_response

log = logging.getLogger(__name__)
_CN_TZ = timezone(timedelta(hours=8))  # DashScope's list times are Beijing time


async def service_call(request: web.Request) -> web.StreamResponse:
    """POST /api/v1/services/aigc/...: sync, SSE and async submits alike (the route's
    name says which service)."""
    ctx, rt, _ = opening = open_request(request)
    service = SERVICE_PATHS[ctx.route]
    req = await read_native_request(request, opening)
    candidates = rt.router.candidates(req.model)
    if not candidates:
        raise no_upstream(req.model)
    images = requested_images(req.model, req.body.get("parameters"))
    # A repeat with a kept answer gets it here, before any limit is used.
    content = partial(json_fingerprint, ctx.route, request.headers, req.body)
    replayed = await begin(request, rt, req.key, content)
    if replayed is not None:
        return replayed
    await admit(request, req.key, model=req.model, images=images)
    key, model, raw = req.key, req.model, req.raw
    # A request waits on DashScope for seconds to a minute: its parsed body is not
    # kept alive meanwhile (memory per request in flight).
    del req, content, opening
    # Failover across the model's upstreams while nothing reached the client
    # (proxy.upstream.failover says what is retried); `oss://` inputs stay pinned.
    async with call_with_failover(
        request,
        candidates,
        ctx.route,
        "POST",
        service,
        Forwarded(request.headers),
        raw,
        pinned=uses_uploads(request),
    ) as call:
        return await relay_settled(request, ctx, rt, key, model, call)


# ----------------------------------------------------------------------------- tasks


def unknown_task(task_id: str, request_id: str) -> web.Response:
    """Exactly what DashScope answers for an id it does not know (HTTP 200)."""
    body = {"request_id": request_id, "output": {"task_id": task_id, "task_status": "UNKNOWN"}}
    return web.Response(body=dumps(body), content_type="application/json")


async def _owned(
    request: web.Request, ctx: RequestContext, rt: Runtime, key: KeyConfig, task_id: str
) -> tuple[TaskRecord, UpstreamConfig] | None:
    record = await request.app[TASKS].get(task_id)
    if record is None or record.key != key.name:
        return None
    set_model(ctx, rt, record.model)
    upstream = rt.router.by_name(record.upstream)
    if upstream is None:
        raise upstream_unavailable(
            f"upstream {record.upstream!r} that created this task is no longer configured"
        )
    ctx.upstream = upstream.name
    return record, upstream


def _task_call(
    request: web.Request, upstream: UpstreamConfig, task_id: str, *, cancel: bool = False
) -> AbstractAsyncContextManager[UpstreamCall]:
    """A task poll (or cancel) on the upstream that created the task: pinned, since the
    task exists nowhere else."""
    return call_pinned(
        request.app,
        upstream,
        "tasks.cancel" if cancel else "tasks.get",
        "POST" if cancel else "GET",
        f"/tasks/{task_id}/cancel" if cancel else f"/tasks/{task_id}",
        request_headers(request.headers, upstream.api_key),
        None,
    )


async def poll_task(
    request: web.Request,
    record: TaskRecord,
    upstream: UpstreamConfig,
    ctx: RequestContext,
    rt: Runtime,
) -> Relayed:
    """GET the task from its upstream, relay it, meter the first SUCCEEDED."""

    async def settled(relayed: Relayed) -> None:
        ctx.upstream_request_id = relayed.upstream_request_id
        ctx.error_code = relayed.error_code
        await settle_task(request.app, origin(ctx), record, relayed.status, relayed.facts)

    # Pinned: the task exists only on the upstream that created it.
    async with _task_call(request, upstream, record.task_id) as call:
        return await relay_response(
            request,
            call.response,
            request.app[METRICS],
            upstream,
            settle=settled,
            rewriter=rewriter_for(request),
        )


async def get_task(request: web.Request) -> web.StreamResponse:
    ctx, rt, key = open_request(request)
    task_id = valid_task_id(request)
    owned = await _owned(request, ctx, rt, key, task_id)
    if owned is None:
        return unknown_task(task_id, ctx.request_id)
    relayed = await poll_task(request, *owned, ctx, rt)
    return relayed.response


async def cancel_task(request: web.Request) -> web.StreamResponse:
    ctx, rt, key = open_request(request)
    task_id = valid_task_id(request)
    owned = await _owned(request, ctx, rt, key, task_id)
    if owned is None:
        # Never reaches DashScope; answered as a task that cannot be canceled,
        # which reveals nothing about whether the id exists.
        raise cancel_refused()
    record, upstream = owned
    async with _task_call(request, upstream, task_id, cancel=True) as call:
        relayed = await relay_response(request, call.response, request.app[METRICS], upstream)
    ctx.error_code = relayed.error_code
    if relayed.status == 200:
        await request.app[TASKS].set_status(task_id, "CANCELED")
        await task_ended(request.app, record.key, task_id)
    return relayed.response


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_parameter(f"{name} must be an integer.") from None
    if not lo <= value <= hi:
        raise invalid_parameter(f"{name} must be between {lo} and {hi}.")
    return value


def _time_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None  # absent; present but empty is as malformed as any other value
    try:
        if len(raw) != 14 or not raw.isdigit():
            raise ValueError(raw)
        return datetime.strptime(raw, "%Y%m%d%H%M%S").replace(tzinfo=_CN_TZ).timestamp()
    except ValueError:
        raise invalid_parameter(f"{name} must be YYYYMMDDhhmmss.") from None


async def list_tasks(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/tasks: this key's tasks only, in DashScope's list shape.

    The gateway's ownership store is authoritative for *which* tasks a key has
    (DashScope's own list covers the whole account, i.e. every team); statuses
    of unfinished tasks on the page are refreshed from the upstream that owns them.
    """
    ctx, rt, key = open_request(request)
    page_no = _int_param(request, "page_no", 1, 1, 1_000_000)
    page_size = _int_param(request, "page_size", 10, 1, 100)
    status = request.query.get("status") or None
    model = request.query.get("model_name") or None
    if model:
        set_model(ctx, rt, model)
    records, total = await request.app[TASKS].list_for_key(
        key.name,
        offset=(page_no - 1) * page_size,
        limit=page_size,
        model=model,
        status=status,
        since=_time_param(request, "start_time"),
        until=_time_param(request, "end_time"),
    )
    records = list(await asyncio.gather(*(_refresh(request, rt, r) for r in records)))
    data = [
        {
            "task_id": r.task_id,
            "status": r.status,
            "model_name": r.model,
            "gmt_create": int(r.created_at * 1000),
            "region": r.upstream,
        }
        for r in records
    ]
    body = {
        "request_id": ctx.request_id,
        "total": total,
        "total_page": math.ceil(total / page_size),
        "page_no": page_no,
        "page_size": page_size,
        "data": data,
        "tasks": data,
    }
    return web.Response(body=dumps(body), content_type="application/json")


async def _refresh(request: web.Request, rt: Runtime, record: TaskRecord) -> TaskRecord:
    """The record with a fresh status from its upstream (unfinished tasks only)."""
    upstream = rt.router.by_name(record.upstream)
    if record.status in TERMINAL or upstream is None:
        return record
    try:
        async with _task_call(request, upstream, record.task_id) as call:
            status = call.response.status
            body = await call.response.read()
    except GatewayError:
        return record  # keep the last known status
    except Exception:  # noqa: BLE001 - a refresh is best effort
        return record
    facts = facts_from_bytes(body)
    if status != 200 or not facts.task_status:
        return record
    # The images are the task's: labelled with its model, not the list's filter.
    await settle_task(request.app, origin(request[CTX]), record, status, facts)
    return replace(record, status=facts.task_status)


async def uploads(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/uploads?action=getPolicy&model=M: the SDK's upload policy for local files."""
    ctx, rt, key = open_request(request)
    model = request.query.get("model")
    if not model:
        raise missing_model()
    set_model(ctx, rt, model)
    rt.keyring.check_allowed(key, model)
    candidates = rt.router.candidates(model)
    if not candidates:
        raise no_upstream(model)
    # Pinned (config order, no failover once sent): the generation that uses the
    # upload must pick the same account (see `uses_uploads`).
    async with call_with_failover(
        request,
        candidates,
        "uploads",
        "GET",
        "/uploads",
        Forwarded(request.headers),
        None,
        params=request.rel_url.query,
        pinned=True,
    ) as call:
        relayed = await relay_response(request, call.response, request.app[METRICS], call.upstream)
    ctx.error_code = relayed.error_code
    return relayed.response


def add_routes(r: Routes, prefix: str = "/api/v1") -> None:
    # One resource per service, so the route name (a metric label) is fixed.
    for name, path in SERVICE_PATHS.items():
        r.post(prefix + path, service_call, name=name)
    r.get(prefix + "/tasks/{task_id}", get_task, name="tasks.get")
    r.post(prefix + "/tasks/{task_id}/cancel", cancel_task, name="tasks.cancel")
    # The SDK calls /tasks, the docs show /tasks/: one resource for both.
    r.get(prefix + "/tasks{slash:/?}", list_tasks, name="tasks.list")
    r.get(prefix + "/uploads", uploads, name="uploads")
