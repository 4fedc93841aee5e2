"""`GET /v1/usage`: the calling key's own images and spend this UTC day and month.

    {"object": "usage", "key": "team-a", "currency": "USD",
     "day":   {"start": "2026-11-22T00:00:00Z", "images": 12, "cost": 0.6,
               "by_model": {"qwen-image-3.0-pro": {"images": 12, "cost": 0.6}},
               "limits": {"images": 500, "spend": 20.0},
               "remaining": {"images": 488, "spend": 19.4}},
     "month": {...}}

A key sees only itself (it is the bearer key's identity; there is no parameter to ask
for another), so teams can watch their own budget without access to Prometheus.

Where the figures come from, and why:
- `images` is the state backend's quota usage (`limiter.usage`), the same count the
  image limits are enforced on: shared by every replica with `state.backend: redis`,
  kept across restarts with `local`.
- `cost` and `by_model` come from the in-process spend book (`proxy.core.pricing.
  SpendBook`), fed by the `Meter` as images are metered. With several replicas or
  `server.workers` each process answers for what it metered itself, and a restart
  starts it empty, until spend counters live in the state backend too. A model with no
  price has `"cost": null` in `by_model` and adds nothing to the period's `cost`.
- `limits` are the key's `images_per_day` / `images_per_month` and `spend_per_day` /
  `spend_per_month` (null: none); `remaining` is limit minus used, never below 0.

Errors are the OpenAI envelope (the route is `openai.usage`): 401 without a valid key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from proxy.config.model import KeyConfig
from proxy.core.inbound import open_request
from proxy.core.pricing import SPEND, PeriodSpend, amount, day_start, month_start, spend_ctx
from proxy.core.spend import spend_caps, spend_key
from proxy.jsonutil import dumps
from proxy.runtime import STATE, Routes

log = logging.getLogger(__name__)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def period_body(
    start: float,
    images: int,
    spend: PeriodSpend,
    image_limit: int | None,
    spend_limit: float | None,
    spent: int | None = None,
) -> dict[str, Any]:
    """Pure: one period `P` of the answer. `spent` (nano-units): the spend the limiter
    counts (shared by replicas) for a key with a spend limit; else this process's book."""
    cost = amount(spend.cost if spent is None else spent)
    by_model = {
        model: {
            "images": s.images,
            "cost": amount(s.cost) if s.images > s.unpriced else None,
        }
        for model, s in sorted(spend.by_model.items())
    }
    return {
        "start": iso(start),
        "images": images,
        "cost": cost,
        "by_model": by_model,
        "limits": {"images": image_limit, "spend": spend_limit},
        "remaining": {
            "images": None if image_limit is None else max(0, image_limit - images),
            "spend": None if spend_limit is None else max(0.0, round(spend_limit - cost, 9)),
        },
    }


async def used_images(request: web.Request, key: KeyConfig, now: float) -> tuple[int, int]:
    """Images used this UTC day and month, from the state backend (shared by replicas);
    the in-process spend book if the backend cannot answer."""
    try:
        return await request.app[STATE].limiter.usage(key.name, now)
    except Exception:
        log.exception("usage: the state backend could not report %s's images", key.name)
        book = request.app[SPEND]
        return book.period(key.name, "day", now).images, book.period(key.name, "month", now).images


async def usage(request: web.Request) -> web.StreamResponse:
    """GET /v1/usage."""
    _ctx, rt, key = open_request(request)
    now = time.time()
    used_day, used_month = await used_images(request, key, now)
    book = request.app[SPEND]
    limits = key.limits
    spent_day = spent_month = None
    if spend_caps(limits) is not None:
        try:  # what spend limits enforce: shared by replicas, kept across restarts
            spent_day, spent_month = await request.app[STATE].limiter.usage(
                spend_key(key.name), now
            )
        except Exception:
            log.exception("usage: the state backend could not report %s's spend", key.name)
    body = {
        "object": "usage",
        "key": key.name,
        "currency": rt.config.pricing.currency,
        "day": period_body(
            day_start(now),
            used_day,
            book.period(key.name, "day", now),
            limits.images_per_day,
            limits.spend_per_day,
            spent_day,
        ),
        "month": period_body(
            month_start(now),
            used_month,
            book.period(key.name, "month", now),
            limits.images_per_month,
            limits.spend_per_month,
            spent_month,
        ),
    }
    return web.Response(body=dumps(body), content_type="application/json")


def add_routes(app: web.Application, r: Routes, prefix: str = "/v1") -> None:
    """The route, and the spend book it reads (a `Meter` listener for the app's life)."""
    r.get(prefix + "/usage", usage, name="openai.usage")
    app.cleanup_ctx.append(spend_ctx)
