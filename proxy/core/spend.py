"""Spend limits: `keys[].limits.spend_per_day` / `spend_per_month`, in `pricing.currency`.

Enforced by the same limiter as the image quotas, so they are exact in one process,
shared by replicas through Redis, persisted across restarts, and atomic at admission:
a key's spend is counted in nano-units of the currency under a companion limiter key
(`<key>:spend`; `:` cannot appear in a configured key name, so it never clashes). At
admission a request reserves the images it may generate at the model's *highest*
price; when its images are metered the reservation is replaced by their actual cost
(the delivered size's tier). A request is refused when spent + reserved + its own
reservation would exceed the limit: concurrent requests cannot overspend. An async
task's reservation follows the task until its images are metered or it ends.

Images of a model with no price reserve nothing and cost nothing: they never block a
request (and are reported as unpriced).

Pure functions only; `proxy.core.admission` applies them.
"""

from __future__ import annotations

import functools
import math

from proxy.config.memo import per_config
from proxy.config.model import LimitsConfig
from proxy.core.pricing import amount, nanos
from proxy.errors import GatewayError
from proxy.state.limiter import (
    IMAGES_DAY,
    Decision,
    seconds_to_next_day,
    seconds_to_next_month,
)

SPEND_DAY, SPEND_MONTH = "spend_per_day", "spend_per_month"


@functools.lru_cache(maxsize=4096)
def spend_key(key: str) -> str:
    """The limiter key that counts `key`'s spend (memoised: one string per key, not one
    more kept by every request in flight)."""
    return key + ":spend"


@per_config
def spend_caps(limits: LimitsConfig) -> LimitsConfig | None:
    """Pure: the spend limits as limiter caps in nano-units, or None without any.
    (Memoised: asked on every request and every metered image.)"""
    if limits.spend_per_day is None and limits.spend_per_month is None:
        return None
    return LimitsConfig(
        images_per_day=None if limits.spend_per_day is None else nanos(limits.spend_per_day),
        images_per_month=None if limits.spend_per_month is None else nanos(limits.spend_per_month),
    )


def reservation(images: int, highest_price: float | None) -> int:
    """Pure: what a request that may generate `images` reserves (nano-units)."""
    if highest_price is None or images <= 0:
        return 0
    return images * nanos(highest_price)


def cost_units(cost: float | None) -> int:
    """Pure: a metered cost in nano-units (an unpriced image costs nothing here)."""
    if cost is None or not math.isfinite(cost) or cost <= 0:
        return 0
    return nanos(cost)


def spend_refusal(
    decision: Decision, limits: LimitsConfig, currency: str, reserve: int, now: float
) -> GatewayError:
    """The 429 for a refused spend reservation, naming the limit, with `Retry-After` the
    seconds to the end of its UTC day or month."""
    daily = decision.limit == IMAGES_DAY
    name = SPEND_DAY if daily else SPEND_MONTH
    cap = (limits.spend_per_day if daily else limits.spend_per_month) or 0.0
    spent = amount(decision.used_day if daily else decision.used_month)
    held = amount(decision.reserved)
    retry = seconds_to_next_day(now) if daily else seconds_to_next_month(now)
    held_text = f", {held:.4f} {currency} held by requests and tasks still running" if held else ""
    return GatewayError(
        429,
        "Throttling.AllocationQuota",
        f"Spend limit {name} of {cap:g} {currency} reached for this key: {spent:.4f} "
        f"{currency} spent{held_text}, and this request may cost up to "
        f"{amount(reserve):.4f} {currency}. It resets at 00:00 UTC"
        f"{'' if daily else ' on the 1st'}.",
        openai_code="spend_limit_exceeded",
        retry_after=max(1, retry),
    )
