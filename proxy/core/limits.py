"""What a generation request may cost, and the refusal when a limit says no.

Pure: `requested_images` is how many images a DashScope body may generate (its
reservation under the image quotas: `parameters.n`, or the model's default n);
`refusal` is the 429 for a refused admission, in both dialects, with
`Retry-After`. The counting itself lives with the state (`proxy.state.limiter`);
the request plumbing in `proxy.core.admission`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config.model import LimitsConfig
from proxy.errors import GatewayError
from proxy.state.limiter import (
    CONCURRENCY,
    IMAGES_DAY,
    RPM,
    Decision,
)

# Default `n` when a request does not say: DashScope's wan families generate 4,
# everything else 1 (DashScope's model pages).
_DEFAULT_N_PREFIXES = ("wan",)


# Interleaved wan2.6-image output: up to `max_images`, 5 by default.
_DEFAULT_MAX_IMAGES = 5


MAX_REQUESTED = 1000  # a larger n is DashScope's to refuse; reserve no more than this


def default_n(model: str) -> int:
    return 4 if model.startswith(_DEFAULT_N_PREFIXES) else 1


def requested_images(model: str, parameters: Any) -> int:
    """Pure: how many images a DashScope request body may generate (its reservation)."""
    params: Mapping[str, Any] = parameters if isinstance(parameters, dict) else {}

    def count(name: str, default: int) -> int:
        v = params.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return min(v, MAX_REQUESTED)
        return default

    if params.get("enable_interleave") is True:
        return count("max_images", _DEFAULT_MAX_IMAGES)
    return count("n", default_n(model))


def refusal(decision: Decision, limits: LimitsConfig, images: int) -> GatewayError:
    """The 429 for a refused admission, in both dialects, with Retry-After."""
    retry = decision.retry_after
    if decision.limit == RPM:
        return GatewayError(
            429,
            "Throttling.RateQuota",
            f"Requests rate limit exceeded for this key ({limits.requests_per_minute} per "
            f"minute), please try again in {retry} s.",
            openai_code="rate_limit_exceeded",
            retry_after=retry,
        )
    if decision.limit == CONCURRENCY:
        return GatewayError(
            429,
            "Throttling.RateQuota",
            f"Too many concurrent requests for this key (at most "
            f"{limits.concurrent_requests} at once), please try again shortly.",
            openai_code="concurrency_limit_exceeded",
            retry_after=retry,
        )
    if decision.limit == IMAGES_DAY:
        cap, used, window = limits.images_per_day or 0, decision.used_day, "daily"
    else:
        cap, used, window = limits.images_per_month or 0, decision.used_month, "monthly"
    left = max(0, cap - used - decision.reserved)
    held = (
        f" ({decision.reserved} held by requests and tasks still running)"
        if decision.reserved
        else ""
    )
    return GatewayError(
        429,
        "Throttling.AllocationQuota",
        f"Image quota exceeded for this key: this request may generate {images} image(s) and "
        f"{left} of the {window} quota of {cap} remain{held}. The {window} quota resets at "
        f"00:00 UTC{' on the 1st' if window == 'monthly' else ''}.",
        openai_code="insufficient_quota",
        retry_after=retry,
    )
