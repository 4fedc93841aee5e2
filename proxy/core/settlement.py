"""Settlement: what happens once DashScope has answered -- count images, record tasks.

Every front end (`/api/v1`, `/aliyun/v1`, `/v1`) and the background reconciler
settle through these functions, so an image is counted the same way whoever
saw it first:

- `meter`: count `images` for a key and the model of the request or task that
  produced them (its bounded label is derived from that model, never from the
  request that happened to observe them);
- `settle_answer`: a generation answer -- a sync answer is metered, an async
  submit is recorded as a task of the key (a sync answer carrying a task id is
  metered through the task's once-only claim);
- `settle_task`: a task poll answer -- the task's last status is remembered,
  a reservation is freed when it ended without images, and the first
  SUCCEEDED is metered exactly once (`TaskStore.claim_metering`);
- `count_once`: the once-per-task claim and its count. The claim is written
  pending with what counting needs (`proxy.state.Claim`) and marked done once
  `meter` has returned, so a process killed in between leaves a claim that
  `finish_claim` counts later (`core.reconciler` finds them), instead of a
  task claimed but never counted.

Nothing here reads a request: the facts come from the caller, so a poll the
gateway makes by itself (no client, no request) settles exactly like a
client's. `RequestContext` is optional and only gathers figures for the access
log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import NamedTuple

from aiohttp import web

from proxy.config.model import KeyConfig, UpstreamConfig
from proxy.core.admission import task_created, task_ended
from proxy.core.keeping import rewriter_for
from proxy.core.pricing import cost_of
from proxy.metering import BodyFacts
from proxy.runtime import METER, METRICS, RUNTIME, TASKS, RequestContext, Runtime
from proxy.state import Claim, owner_id
from proxy.state.tasks import TERMINAL, TaskRecord
from proxy.upstream.failover import UpstreamCall
from proxy.upstream.relay import Relayed, relay_response

log = logging.getLogger(__name__)

# Tasks whose claim this process holds and is counting right now: never finished by
# `core.reconciler` meanwhile, however old the claim looks.
COUNTING: set[str] = set()
# Tasks this process counted but could not mark done (the store failed): finishing their
# claim must not count them again, with or without a usage log to check.
COUNTED_UNDONE: set[str] = set()


class Origin(NamedTuple):
    """Who observed an answer: the route and request id written with its count."""

    route: str
    request_id: str
    ctx: RequestContext | None = None


async def meter(
    app: web.Application,
    origin: Origin,
    *,
    key: str,
    model: str,
    upstream: str,
    images: int,
    task_id: str | None = None,
    anomaly: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> None:
    """Count `images` of `key` on `model` (the name the client asked for), priced at the
    delivered `width` x `height` under the price table current now (a reload that changes
    a price applies from the next image metered)."""
    if images <= 0:
        return
    if origin.ctx is not None:
        origin.ctx.images += images
    rt = app[RUNTIME].current
    pricing = rt.config.pricing
    cost = cost_of(pricing, model, images, width, height)
    await app[METER].record(
        key=key,
        model=model,
        model_label=rt.models.label(model),
        images=images,
        route=origin.route,
        upstream=upstream,
        request_id=origin.request_id,
        task_id=task_id,
        anomaly=anomaly,
        width=width,
        height=height,
        cost=cost,
        currency=pricing.currency if cost is not None else None,
    )


def new_task(
    app: web.Application,
    task_id: str,
    key: str,
    model: str,
    upstream: str,
    route: str,
    status: str | None,
    meta: str | None = None,
) -> TaskRecord:
    """The record of a task DashScope just created, with its first background poll
    scheduled `tasks.reconcile_after_seconds` from now."""
    now = time.time()
    after = app[RUNTIME].current.config.tasks.reconcile_after_seconds
    return TaskRecord(
        task_id,
        key,
        model,
        upstream,
        route,
        now,
        status or "PENDING",
        meta=meta,
        next_check=now + after,
    )


async def settle_answer(
    app: web.Application,
    origin: Origin,
    *,
    key: str,
    model: str,
    upstream: str,
    facts: BodyFacts,
    meta: str | None = None,
) -> TaskRecord | None:
    """A successful generation answer: record the task it created (returned; None when
    there is none, or the state store failed to record it), and meter what it reports.
    The caller has checked the answer is an HTTP 200."""
    app[RUNTIME].current.models.seen_succeeding(model)
    if origin.ctx is not None:
        origin.ctx.model_label = app[RUNTIME].current.models.label(model)
    finished = facts.task_status in (None, "SUCCEEDED")
    if not facts.task_id:
        if facts.image_count and finished:
            await _meter_answer(app, origin, key, model, upstream, facts)
        return None
    # An async submit (PENDING), or a sync_call answering the final task shape:
    # either way the task is ours, and metered at most once.
    record = new_task(
        app, facts.task_id, key, model, upstream, origin.route, facts.task_status, meta
    )
    store = app[TASKS]
    try:
        await store.put(record)
    except Exception:
        # The state store failed: the task cannot be routed or claimed later, so
        # count a finished answer now (no later poll can count it again).
        log.exception("recording task %s failed", facts.task_id)
        if facts.image_count and finished:
            await _meter_answer(app, origin, key, model, upstream, facts)
        return None
    if facts.image_count and finished:
        await count_once(
            app, origin, facts.task_id, key=key, model=model, upstream=upstream, facts=facts
        )
    return record


async def _meter_answer(
    app: web.Application, origin: Origin, key: str, model: str, upstream: str, facts: BodyFacts
) -> None:
    """Count what one answer reports, without a task claim (a sync answer, or a finished
    task answer the state store could not record: no later poll can count it again)."""
    await meter(
        app,
        origin,
        key=key,
        model=model,
        upstream=upstream,
        images=facts.image_count or 0,
        task_id=facts.task_id,
        anomaly=facts.anomaly,
        width=facts.width,
        height=facts.height,
    )


async def settle_task(
    app: web.Application, origin: Origin, record: TaskRecord, status: int, facts: BodyFacts
) -> bool:
    """A poll of `record` answered `status` with `facts`: remember its status, free its
    reservation if it ended without images, meter its first SUCCEEDED. True if this
    call counted its images."""
    if status != 200 or not facts.task_status:
        return False
    counted = False
    if facts.task_status == "SUCCEEDED" and facts.image_count:
        # Claimed before the status is stored: a task is never final and unclaimed.
        counted = await count_once(
            app,
            origin,
            record.task_id,
            key=record.key,
            model=record.model,
            upstream=record.upstream,
            facts=facts,
        )
    if facts.task_status != record.status:
        await app[TASKS].set_status(record.task_id, facts.task_status)
        if facts.task_status in TERMINAL and not (
            facts.task_status == "SUCCEEDED" and facts.image_count
        ):
            await task_ended(app, record.key, record.task_id)
    return counted


async def count_once(
    app: web.Application,
    origin: Origin,
    task_id: str,
    *,
    key: str,
    model: str,
    upstream: str,
    facts: BodyFacts,
) -> bool:
    """Claim `task_id` and count the images `facts` report: once for every replica, poll
    and restart. True if this call counted them."""
    claim = Claim(
        key=key,
        model=model,
        upstream=upstream,
        images=facts.image_count or 0,
        route=origin.route,
        request_id=origin.request_id,
        owner=owner_id(),
        at=time.time(),
        anomaly=facts.anomaly,
        ledger=app[RUNTIME].current.config.server.usage_log,
        width=facts.width,
        height=facts.height,
    )
    if not await app[TASKS].claim_metering(task_id, claim):
        return False
    COUNTING.add(task_id)
    try:
        await _meter_claim(app, origin, task_id, claim)
        await _done(app, task_id, claim)
    finally:
        COUNTING.discard(task_id)
    return True


async def finish_claim(app: web.Application, task_id: str, claim: Claim, *, written: bool) -> bool:
    """Finish a claim its owner left pending (it died, or could not mark it done): take it
    over, count its images unless its ledger line was `written` before the owner died,
    mark it done. The take-over is a compare-and-set, so of several processes finishing
    the same claim exactly one does. True if this call finished it."""
    ledger = app[RUNTIME].current.config.server.usage_log
    mine = replace(claim, owner=owner_id(), at=time.time(), ledger=ledger)
    if not await app[TASKS].take_over(task_id, claim, mine):
        return False
    COUNTING.add(task_id)
    try:
        if not written:
            await _meter_claim(app, Origin(claim.route, claim.request_id), task_id, claim)
        await _done(app, task_id, mine)
    finally:
        COUNTING.discard(task_id)
    app[METRICS].metering_claims_finished.labels(
        "already_in_ledger" if written else "counted"
    ).inc()
    log.warning(
        "task %s: finished the metering claim %s left pending (%d image(s), %s)",
        task_id,
        claim.owner,
        claim.images,
        "already in the usage log" if written else "counted now",
    )
    return True


async def _meter_claim(app: web.Application, origin: Origin, task_id: str, claim: Claim) -> None:
    await meter(
        app,
        origin,
        key=claim.key,
        model=claim.model,
        upstream=claim.upstream,
        images=claim.images,
        task_id=task_id,
        anomaly=claim.anomaly,
        width=claim.width,
        height=claim.height,
    )


async def _done(app: web.Application, task_id: str, claim: Claim) -> None:
    try:
        done = await app[TASKS].finish_metering(task_id, claim)
    except Exception:
        # Counted, but still pending in the store: the reconciler finishes it (and
        # finds its ledger line, if there is a ledger).
        log.exception("marking the metering claim of task %s done failed", task_id)
        COUNTED_UNDONE.add(task_id)
        return
    COUNTED_UNDONE.discard(task_id)
    if not done:
        # Taken over meanwhile: this process stalled longer than
        # `tasks.pending_claim_seconds` between claiming and counting.
        log.warning(
            "task %s: its metering claim was finished by another process while this one "
            "counted it: its images may be counted twice",
            task_id,
        )


# --------------------------------------------------- settling a relayed answer


async def settle(
    request: web.Request,
    ctx: RequestContext,
    key: KeyConfig,
    model: str,
    upstream: UpstreamConfig,
    relayed: Relayed,
    meta: str | None = None,
) -> None:
    """After a service call: record a created task, meter what DashScope reported."""
    ctx.upstream_request_id = relayed.upstream_request_id
    ctx.error_code = relayed.error_code
    if relayed.status != 200:
        return
    record = await settle_answer(
        request.app,
        origin(ctx),
        key=key.name,
        model=model,
        upstream=upstream.name,
        facts=relayed.facts,
        meta=meta,
    )
    if record is not None and record.status not in TERMINAL:
        await task_created(request, record.task_id)  # its reservation follows the task


def origin(ctx: RequestContext) -> Origin:
    return Origin(ctx.route, ctx.request_id, ctx)


async def relay_settled(
    request: web.Request,
    ctx: RequestContext,
    rt: Runtime,
    key: KeyConfig,
    model: str,
    call: UpstreamCall,
) -> web.StreamResponse:
    """Relay a service call's answer unchanged (but for image links, with `storage:`),
    settling it (task, images) before its end."""
    upstream = call.upstream

    async def settled(relayed: Relayed) -> None:
        await settle(request, ctx, key, model, upstream, relayed)

    relayed = await relay_response(
        request,
        call.response,
        request.app[METRICS],
        upstream,
        settle=settled,
        rewriter=rewriter_for(request),
    )
    return relayed.response
