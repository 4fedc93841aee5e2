"""Money: what a delivered image costs, and what each key has spent today and this month.

- `cost_of(pricing, model, images, width, height)`: the cost of `images` images of
  `model` at the delivered size, under `pricing:` (the config's price table). The first
  pattern that matches the model wins (a dated snapshot such as
  `qwen-image-3.0-pro-2026-04-22` falls back to its family's price, as it does for
  routing); within it the first tier whose `max_pixels >= width * height`, else its
  `per_image` (also when DashScope did not report the size: the conservative price).
  A model no pattern matches is unpriced: None, never 0, so reports can say so.
- `highest_price(pricing, model)`: the most one image of `model` can cost (what a spend
  reservation needs before the size is known).
- `SpendBook`: a `Meter` listener keeping each key's images and cost per model for the
  current UTC day and month, what `GET /v1/usage` reports. It lives in this process:
  with several replicas or `server.workers` each has its own (the images figure of
  `/v1/usage` comes from the state backend and is shared); it starts empty after a
  restart. Shared spend counters belong in the state backend, next to the image quotas.

Amounts are floats in the config and the metric; sums are kept in integer nano-units so
a month of additions never drifts (0.1 + 0.2 is 0.3 here).

Why at metering time: the cost must follow the images DashScope actually delivered
(count and size), never the request, and a reload that changes a price must apply to
the images metered after it. So `core.settlement.meter` reads the price table of the
current runtime each time it meters.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from aiohttp import web

from proxy.catalogue import family
from proxy.config.memo import per_config
from proxy.config.model import ModelPrice, PricingConfig
from proxy.metering import UsageEvent
from proxy.runtime import METER, METRICS, RUNTIME, Runtime
from proxy.state.limiter import current_periods

log = logging.getLogger(__name__)

NANO = 1_000_000_000
# Models kept per key and period before the rest are summed as `other` (bounded memory).
MAX_MODELS = 256
OTHER = "other"
# How often the precreated cost series follow a reload (new keys, new prices).
FOLLOW_SECONDS = 1.0


# ------------------------------------------------------------------------ prices


# Models whose price entry each table remembers (model names come from clients).
MAX_MODELS = 4096


@per_config
def _entries(pricing: PricingConfig) -> dict[str, ModelPrice | None]:
    return {}  # filled by price_entry: model -> its entry in this table


def price_entry(pricing: PricingConfig, model: str) -> ModelPrice | None:
    """The first entry whose pattern matches `model`, else its family's; None: unpriced.
    (Memoised per table and model: asked at admission and when images are metered.)"""
    known = _entries(pricing)
    try:
        return known[model]
    except KeyError:
        pass
    found = None
    for name in dict.fromkeys((model, family(model))):
        found = next((e for e in pricing.models if fnmatchcase(name, e.pattern)), None)
        if found is not None:
            break
    if len(known) < MAX_MODELS:
        known[model] = found
    return found


def unit_price(entry: ModelPrice, width: int | None, height: int | None) -> float:
    """Pure: one image's price under `entry` at the delivered size."""
    if width is not None and height is not None:
        pixels = width * height
        for tier in entry.tiers:
            if tier.max_pixels >= pixels:
                return tier.per_image
    return entry.per_image


def cost_of(
    pricing: PricingConfig, model: str, images: int, width: int | None, height: int | None
) -> float | None:
    """Pure: what `images` delivered images of `model` cost; None when it has no price.

    Rounded to nano-units so `0.075 * 3` is logged as 0.225, not 0.22499999999999998.
    """
    entry = price_entry(pricing, model)
    if entry is None:
        return None
    return round(unit_price(entry, width, height) * images, 9)


def highest_price(pricing: PricingConfig, model: str) -> float | None:
    """Pure: the most one image of `model` can cost; None when it has no price."""
    entry = price_entry(pricing, model)
    if entry is None:
        return None
    return max([entry.per_image, *(t.per_image for t in entry.tiers)])


def nanos(amount: float) -> int:
    return round(amount * NANO)


def amount(nano_units: int) -> float:
    return nano_units / NANO


# --------------------------------------------------------------------- spend book


@dataclass(slots=True)
class ModelSpend:
    images: int = 0
    cost: int = 0  # nano-units of priced images
    unpriced: int = 0  # images with no price

    def add(self, images: int, cost: float | None) -> None:
        self.images += images
        if cost is None:
            self.unpriced += images
        else:
            self.cost += nanos(cost)


@dataclass(slots=True)
class PeriodSpend:
    """One key's spend in one UTC day or month, per model."""

    by_model: dict[str, ModelSpend] = field(default_factory=dict)

    def add(self, model: str, images: int, cost: float | None) -> None:
        spend = self.by_model.get(model)
        if spend is None:
            if len(self.by_model) >= MAX_MODELS:
                model = OTHER
            spend = self.by_model.setdefault(model, ModelSpend())
        spend.add(images, cost)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.by_model.values())

    @property
    def cost(self) -> int:
        return sum(s.cost for s in self.by_model.values())


def day_start(now: float) -> float:
    return now - now % 86400


def month_start(now: float) -> float:
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


class SpendBook:
    """Each key's images and cost per model, this UTC day and month; a `Meter` listener.

    Past periods are dropped as soon as a new one begins, so memory is bounded by keys x
    models. In this process only (see the module docstring).
    """

    def __init__(self) -> None:
        self._periods: dict[tuple[str, str], PeriodSpend] = {}

    def __call__(self, event: UsageEvent) -> None:
        self.add(event.key, event.model, event.images, event.cost, event.timestamp)

    def add(self, key: str, model: str, images: int, cost: float | None, when: float) -> None:
        for period in current_periods(when):
            spend = self._periods.get((key, period))
            if spend is None:
                self._forget_old(when)
                spend = self._periods.setdefault((key, period), PeriodSpend())
            spend.add(model, images, cost)

    def period(self, key: str, window: str, now: float) -> PeriodSpend:
        """`window` is "day" or "month"; an empty spend when nothing was metered."""
        day, month = current_periods(now)
        name = day if window == "day" else month
        return self._periods.get((key, name)) or PeriodSpend()

    def _forget_old(self, now: float) -> None:
        keep = set(current_periods(now))
        for k in [k for k in self._periods if k[1] not in keep]:
            del self._periods[k]


SPEND = web.AppKey("spend", SpendBook)


# ----------------------------------------------------------------- wiring to the app


def priced_models(runtime: Runtime) -> list[str]:
    """Label values a dashboard should see at 0 from the start, for every key: the priced
    patterns that name one model (no glob characters), and `other`, so every configured
    key has a cost series (at 0) before its first priced image, even with no `pricing:`."""
    names = [
        p.pattern for p in runtime.config.pricing.models if not any(c in p.pattern for c in "*?[")
    ]
    return sorted({runtime.models.label(n) for n in names} | {OTHER})


def precreate(app: web.Application, runtime: Runtime) -> None:
    """`dashscope_proxy_cost_total` at 0 for every configured key and priced model."""
    keys: Iterable[str] = (k.name for k in runtime.config.keys)
    app[METRICS].precreate_cost(keys, priced_models(runtime), runtime.config.pricing.currency)


async def spend_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the spend book listens to the Meter; cost series are precreated at
    startup and again after each reload (a cheap check once a second)."""
    book = app[SPEND] = SpendBook()
    app[METER].listeners.append(book)
    holder = app[RUNTIME]
    seen = holder.current
    precreate(app, seen)

    async def follow() -> None:
        nonlocal seen
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            if holder.current is not seen:
                seen = holder.current
                try:
                    precreate(app, seen)
                except Exception:
                    log.exception("precreating cost series after a reload failed")

    task = asyncio.create_task(follow(), name="spend-follow")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(ValueError):
            app[METER].listeners.remove(book)
