"""Running one DashScope generation for a front end that needs the final answer.

The OpenAI images API cannot relay DashScope's bytes: it answers in another
shape, so it needs the whole DashScope answer. This module calls DashScope on
the client's behalf and reads small JSON answers whole:

- `call_sync`: one sync call (multimodal-generation, or text2image without the
  async header), metered from its `usage.image_count`;
- `submit`: an async submit (`X-DashScope-Async: enable`), the task recorded
  for the key like any native submit, so only that key can poll it;
- `poll_once` / `wait_for`: task polls, metered once per task by the same
  `TaskStore.claim_metering` the native poll path uses, following DashScope's
  polling guidance (the official SDK's schedule: 1, 1, 2, 2, 2, 4, 4, 4, 5 s...)
  until the task ends or the caller's deadline passes.

Upstream errors come back as `GatewayError`s in the OpenAI envelope
(`openai_translate.upstream_error`). An answer that could carry images but is
never read whole (a read timeout, a truncated body, a 200 that is not JSON) is
counted as unmetered (`relay.answer_lost`, with the task id of a poll) before
the error is raised. Deliberately not here: request and response translation,
image fetching, HTTP handlers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.catalogue import SERVICE_PATHS
from proxy.config.model import KeyConfig, UpstreamConfig
from proxy.core.settlement import Origin, meter, new_task, settle_task
from proxy.errors import GatewayError, upstream_bad_answer
from proxy.fronts.openai.errors import still_running, task_error, task_unknown, upstream_error
from proxy.jsonutil import dumps, loads
from proxy.metering import facts_from_json
from proxy.runtime import METRICS, RUNTIME, TASKS, RequestContext
from proxy.state.tasks import TERMINAL, TaskRecord
from proxy.upstream.call import UpstreamFailure, map_client_error
from proxy.upstream.failover import call_with_failover
from proxy.upstream.pinned import call_pinned
from proxy.upstream.relay import ANSWER, AWAITED, RECEIVED, answer_lost, lost_reason

# DashScope's JSON answers are a few KB; anything near this is not an answer.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# The 1.x SDK's `wait()` schedule (`BaseAsyncApi.wait`), then 5 s.
POLL_DELAYS = (1.0, 1.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0)
POLL_DELAY_MAX = 5.0
# Task polls DashScope asks callers to retry (the SDK's REPEATABLE_STATUS).
_RETRY_POLL = frozenset({503, 504})
# Client headers worth forwarding to DashScope on a translated request.
_FORWARDED = ("X-DashScope-WorkSpace", "X-DashScope-DataInspection")


class Answer(NamedTuple):
    """One DashScope JSON answer, read whole."""

    status: int
    body: Any  # parsed JSON (None if not JSON)
    retry_after: int | None
    request_id: str | None

    def error(self) -> GatewayError:
        code = message = None
        if isinstance(self.body, dict):
            code = self.body.get("code") if isinstance(self.body.get("code"), str) else None
            message = (
                self.body.get("message") if isinstance(self.body.get("message"), str) else None
            )
        return upstream_error(self.status, code, message, self.retry_after)


def dashscope_headers(
    incoming: Mapping[str, str], api_key: str, *, async_: bool
) -> CIMultiDict[str]:
    """Pure: fresh headers for a translated request (nothing of the OpenAI client's own)."""
    out: CIMultiDict[str] = CIMultiDict()
    out["Authorization"] = f"Bearer {api_key}"
    out["Accept"] = "application/json"
    out["Accept-Encoding"] = "identity"
    for name in _FORWARDED:
        if name in incoming:
            out[name] = incoming[name]
    if async_:
        out["X-DashScope-Async"] = "enable"
    return out


async def _call(
    request: web.Request,
    candidates: Sequence[UpstreamConfig],
    endpoint: str,
    path: str,
    body: bytes,
    *,
    async_: bool,
) -> tuple[UpstreamConfig, Answer]:
    """A generation POST through `failover.call_with_failover`: the first of `candidates`
    that takes it answers. The upstream that answered, and its answer read whole."""

    def headers_for(upstream: UpstreamConfig) -> CIMultiDict[str]:
        headers = dashscope_headers(request.headers, upstream.api_key, async_=async_)
        headers["Content-Type"] = "application/json"
        return headers

    request[ANSWER] = AWAITED
    try:
        async with call_with_failover(
            request, candidates, endpoint, "POST", path, headers_for, body
        ) as call:
            return call.upstream, await _read_answer(request, call.upstream, call.response)
    except UpstreamFailure as failure:
        await _lost(request, failure)
        raise


async def _lost(request: web.Request, failure: UpstreamFailure, task_id: str | None = None) -> None:
    """A call that failed after it was sent (no-op otherwise): DashScope may have run it."""
    reason = lost_reason(failure)
    if reason is not None:
        await answer_lost(request, reason, task_id)


async def _read_answer(
    request: web.Request,
    upstream: UpstreamConfig,
    resp: aiohttp.ClientResponse,
    task_id: str | None = None,
) -> Answer:
    """The answer read whole; a 2xx that cannot be is counted as unmetered, then raised."""
    metrics = request.app[METRICS]
    try:
        if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
            raw = b""
        else:
            # read() keeps a body failover already peeked at; content.read() would not.
            raw = await (
                resp.read()
                if resp.content_length is not None
                else resp.content.read(MAX_ANSWER_BYTES + 1)
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        failure = map_client_error(exc)
        metrics.upstream_errors.labels(upstream.name, failure.kind).inc()
        if 200 <= resp.status < 300:
            await _lost(request, failure, task_id)
        else:
            request[ANSWER] = RECEIVED  # DashScope refused it: no image to count
        raise failure from None
    finally:
        resp.release()
    try:
        parsed = loads(raw) if raw and len(raw) <= MAX_ANSWER_BYTES else None
    except (ValueError, RecursionError):
        parsed = None
    answer = Answer(
        resp.status,
        parsed,
        _retry_after(resp.headers.get("Retry-After")),
        resp.headers.get("x-request-id"),
    )
    if resp.status != 200:
        code = parsed.get("code") if isinstance(parsed, dict) else None
        label = code[:64] if isinstance(code, str) and code else str(resp.status)
        metrics.upstream_errors.labels(upstream.name, label).inc()
    elif not isinstance(parsed, dict):
        metrics.upstream_errors.labels(upstream.name, "bad_answer").inc()
        # Not JSON (or too large to read): whatever it says was generated is lost.
        await answer_lost(request, "invalid_json", task_id)
        raise upstream_bad_answer("DashScope answered with a body that is not JSON.")
    return answer


def _retry_after(value: str | None) -> int | None:
    if value and value.strip().isdigit():
        return int(value.strip())
    return None


async def call_sync(
    request: web.Request,
    ctx: RequestContext,
    key: KeyConfig,
    model: str,
    candidates: Sequence[UpstreamConfig],
    endpoint: str,
    body: dict[str, Any],
) -> Any:
    """One sync generation on `endpoint` (an `Endpoint` value) on the first of
    `candidates` that takes it: the DashScope answer, metered; upstream errors raised."""
    upstream, answer = await _call(
        request, candidates, endpoint, SERVICE_PATHS[endpoint], dumps(body), async_=False
    )
    ctx.upstream_request_id = answer.request_id
    if answer.status != 200:
        raise answer.error()
    facts = facts_from_json(answer.body)
    _seen_succeeding(request, ctx, model)
    if facts.image_count:
        # A sync answer is metered here, once; a final-task-shaped answer
        # (text2image sync_call) carries a task id nobody will poll.
        await meter(
            request.app,
            Origin(ctx.route, ctx.request_id, ctx),
            key=key.name,
            model=model,
            upstream=upstream.name,
            images=facts.image_count,
            task_id=facts.task_id,
            anomaly=facts.anomaly,
            width=facts.width,
            height=facts.height,
        )
    request[ANSWER] = RECEIVED
    return answer.body


async def submit(
    request: web.Request,
    ctx: RequestContext,
    key: KeyConfig,
    model: str,
    candidates: Sequence[UpstreamConfig],
    endpoint: str,
    body: dict[str, Any],
    meta: str,
) -> TaskRecord:
    """An async submit; the task is recorded for `key` (and `model`, the name asked for)
    with the upstream that accepted it, where its polls go."""
    upstream, answer = await _call(
        request, candidates, endpoint, SERVICE_PATHS[endpoint], dumps(body), async_=True
    )
    ctx.upstream_request_id = answer.request_id
    if answer.status != 200:
        raise answer.error()
    facts = facts_from_json(answer.body)
    if not facts.task_id:
        raise upstream_bad_answer("DashScope accepted the task but sent no task_id.")
    record = new_task(
        request.app,
        facts.task_id,
        key.name,
        model,
        upstream.name,
        ctx.route,
        facts.task_status,
        meta,
    )
    await request.app[TASKS].put(record)
    request[ANSWER] = RECEIVED  # the task is recorded: its polls (or the reconciler) count it
    _seen_succeeding(request, ctx, model)
    return record


def _seen_succeeding(request: web.Request, ctx: RequestContext, model: str) -> None:
    """DashScope accepted `model`: label it by name from now on (as `settle_answer` does)."""
    models = request.app[RUNTIME].current.models
    models.seen_succeeding(model)
    ctx.model_label = models.label(model)


async def poll_once(
    request: web.Request, ctx: RequestContext, record: TaskRecord, upstream: UpstreamConfig
) -> Answer:
    """GET the task once; meter it if this is the first poll that shows it SUCCEEDED."""
    headers = dashscope_headers(request.headers, upstream.api_key, async_=False)
    request[ANSWER] = AWAITED
    try:
        # Pinned: the task exists only on the upstream that created it.
        async with call_pinned(
            request.app, upstream, "tasks.get", "GET", f"/tasks/{record.task_id}", headers, None
        ) as call:
            answer = await _read_answer(request, upstream, call.response, record.task_id)
    except UpstreamFailure as failure:
        await _lost(request, failure, record.task_id)
        raise
    if answer.status == 200:
        await settle_task(
            request.app,
            Origin(ctx.route, ctx.request_id, ctx),
            record,
            answer.status,
            facts_from_json(answer.body),
        )
    request[ANSWER] = RECEIVED
    return answer


def task_status(body: Any) -> str | None:
    output = body.get("output") if isinstance(body, dict) else None
    status = output.get("task_status") if isinstance(output, dict) else None
    return status if isinstance(status, str) else None


async def wait_for(
    request: web.Request,
    ctx: RequestContext,
    record: TaskRecord,
    upstream: UpstreamConfig,
    deadline_seconds: float,
) -> Any:
    """Poll until the task ends: its SUCCEEDED answer, or a GatewayError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    step = 0
    while True:
        delay = POLL_DELAYS[step] if step < len(POLL_DELAYS) else POLL_DELAY_MAX
        step += 1
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise still_running(record, deadline_seconds)
        await asyncio.sleep(min(delay, remaining))
        answer = await poll_once(request, ctx, record, upstream)
        if answer.status in _RETRY_POLL:
            continue
        if answer.status != 200:
            raise answer.error()
        status = task_status(answer.body)
        if status == "SUCCEEDED":
            return answer.body
        if status in TERMINAL:
            raise task_error(answer.body) if status != "UNKNOWN" else task_unknown(record)
