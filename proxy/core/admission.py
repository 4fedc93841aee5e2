"""Applying per-key limits to requests: the one call every generation handler makes.

    await admit(request, key, model=model, images=n)

right after authentication and parsing (the model and `n` are needed), before
anything reaches DashScope. It checks and records `requests_per_minute`,
`concurrent_requests` and the image quotas in one step (one Lua call with
Redis) and refuses with 429 (`Throttling.RateQuota` /
`Throttling.AllocationQuota` under /api/v1, `rate_limit_error` under /v1)
with `Retry-After`. The concurrency slot and the request's image reservation
are released by the request pipeline when the request ends, however it ends.

The rest of the module keeps reservations true to what happens next:
`task_created` (an async submit was accepted: the reservation follows the
task), `task_ended` (a task failed or was cancelled: nothing to meter) and
`usage_listener` (the `Meter` listener that counts metered images against
the quotas and settles reservations). `limits_ctx` keeps
`dashscope_proxy_quota_remaining_images` fresh for keys with quotas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from proxy.config.model import KeyConfig, LimitsConfig
from proxy.core.limits import refusal
from proxy.core.pricing import highest_price
from proxy.core.spend import (
    SPEND_DAY,
    SPEND_MONTH,
    cost_units,
    reservation,
    spend_caps,
    spend_key,
    spend_refusal,
)
from proxy.metering import UsageEvent, UsageListener
from proxy.metrics import Metrics
from proxy.runtime import CTX, METER, METRICS, RUNTIME, STATE, Runtime
from proxy.state.limiter import DAY, IMAGES_DAY, MONTH, Limiter, has_limits, has_quota

log = logging.getLogger(__name__)

GAUGE_REFRESH_SECONDS = 15.0


@dataclass(slots=True)
class Admission:
    """A request admitted under limits: `token` names its slot and reservation. Calling
    it releases both: it is the request's cleanup, run however the request ends. (Not
    frozen: made once or twice per limited request, and a frozen dataclass costs about
    four times as much to make.)"""

    limiter: Limiter
    key: str
    token: str
    images: int

    def __call__(self) -> None:
        self.limiter.release(self.key, self.token)


async def admit(request: web.Request, key: KeyConfig, *, model: str, images: int) -> None:
    """Admit a generation request of `key` that may generate `images`, or raise 429.

    A key without limits costs nothing here. `model` is what DashScope will be asked
    for: its highest price is what a spend limit reserves per image.
    """
    limits = key.limits
    caps, limited = spend_caps(limits), has_limits(limits)
    if not limited and caps is None:
        return
    app = request.app
    ctx = request[CTX]
    limiter = app[STATE].limiter
    metrics = app[METRICS]
    name, token, now = key.name, ctx.request_id, time.time()
    if limited:
        reserve = images if has_quota(limits) else 0
        decision = await limiter.admit(name, limits, token, reserve, now)
        set_remaining(metrics, name, limits, decision.used_day, decision.used_month)
        if not decision.allowed:
            metrics.limit_rejections.labels(name, decision.limit or "unknown").inc()
            raise refusal(decision, limits, images)
        ctx.cleanups.append(Admission(limiter, name, token, reserve))
    if caps is not None:
        pricing = app[RUNTIME].current.config.pricing
        units = reservation(images, highest_price(pricing, model))
        decision = await limiter.admit(spend_key(name), caps, token, units, now)
        if not decision.allowed:
            limit = SPEND_DAY if decision.limit == IMAGES_DAY else SPEND_MONTH
            metrics.limit_rejections.labels(name, limit).inc()
            raise spend_refusal(decision, limits, pricing.currency, units, now)
        ctx.cleanups.append(Admission(limiter, spend_key(name), token, units))


async def task_created(request: web.Request, task_id: str) -> None:
    """An async submit of this request created `task_id`: its reservations (images, and
    spend) move to the task until the task's images are metered or it ends."""
    ctx = request.get(CTX)
    if ctx is None:
        return
    limiter = request.app[STATE].limiter
    for admitted in ctx.cleanups:  # the image reservation, then the spend one
        if isinstance(admitted, Admission) and admitted.images:
            await limiter.hold_for_task(admitted.key, admitted.token, task_id, time.time())


async def task_ended(app: web.Application, key: str, task_id: str) -> None:
    """`task_id` of `key` ended without images (FAILED, CANCELED, UNKNOWN)."""
    rt = app[RUNTIME].current
    if _limits_of(rt, key) is not None:
        await app[STATE].limiter.settle_task(key, task_id)
    if _spend_caps_of(rt, key) is not None:
        await app[STATE].limiter.settle_task(spend_key(key), task_id)


def _spend_caps_of(rt: Runtime, key: str) -> LimitsConfig | None:
    found = rt.keyring.by_name(key)
    return None if found is None else spend_caps(found.limits)


def _limits_of(rt: Runtime, key: str) -> LimitsConfig | None:
    found = rt.keyring.by_name(key)
    return found.limits if found is not None and has_quota(found.limits) else None


def set_remaining(
    metrics: Metrics, key: str, limits: LimitsConfig, used_day: int, used_month: int
) -> None:
    if limits.images_per_day is not None:
        metrics.quota_left.set(max(0, limits.images_per_day - used_day), key, DAY)
    if limits.images_per_month is not None:
        metrics.quota_left.set(max(0, limits.images_per_month - used_month), key, MONTH)


def usage_listener(app: web.Application) -> UsageListener:
    """The `Meter` listener: metered images count against the key's quotas."""

    async def on_usage(event: UsageEvent) -> None:
        tokens = [event.request_id]
        if event.task_id:
            tokens.append("t:" + event.task_id)
        used_day, used_month = await app[STATE].limiter.record_usage(
            event.key, event.images, tokens, event.timestamp
        )
        rt = app[RUNTIME].current
        limits = _limits_of(rt, event.key)
        if limits is not None:
            set_remaining(app[METRICS], event.key, limits, used_day, used_month)
        if _spend_caps_of(rt, event.key) is not None:
            # The reservation (at the highest price) becomes the actual cost.
            await app[STATE].limiter.record_usage(
                spend_key(event.key), cost_units(event.cost), tokens, event.timestamp
            )

    return on_usage


async def refresh_gauges(app: web.Application) -> None:
    """Set the remaining-quota gauge of every key with a quota from the state backend."""
    limiter = app[STATE].limiter
    for key in app[RUNTIME].current.config.keys:
        if has_quota(key.limits):
            used_day, used_month = await limiter.usage(key.name, time.time())
            set_remaining(app[METRICS], key.name, key.limits, used_day, used_month)


async def limits_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after the state backend's): the usage listener, and a background
    refresh of the quota gauges (usage on other replicas, a new day or month, keys
    added by a reload)."""
    listener = usage_listener(app)
    app[METER].listeners.append(listener)

    async def refresh_forever() -> None:
        while True:
            try:
                await refresh_gauges(app)
            except Exception:
                log.exception("refreshing quota gauges failed")
            await asyncio.sleep(GAUGE_REFRESH_SECONDS)

    task = asyncio.create_task(refresh_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(ValueError):
        app[METER].listeners.remove(listener)
