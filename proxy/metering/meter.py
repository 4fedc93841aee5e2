"""Recording counts: `Meter`, the one place an image count (and its cost) is recorded.

The metric first (never lost), then any listeners the app registers (usage
ledger, quotas, the per-key spend book). `Meter.unmetered` records what could
not be counted (an answer never received whole: `UnmeteredEvent`), for the
metric and the ledger only, since quotas have no number to charge.

The cost is computed by the caller (`proxy.core.pricing`, from the price table
current at that moment) and only recorded here, so this module stays free of
configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from proxy.metrics import Metrics

log = logging.getLogger(__name__)


class UsageEvent(NamedTuple):
    """One metered outcome: `images` generated for `key` on `model`."""

    key: str
    model: str
    model_label: str
    images: int
    route: str
    upstream: str
    request_id: str
    task_id: str | None
    timestamp: float
    # The delivered size (None: not reported) and the cost (None: unpriced) in `currency`.
    width: int | None = None
    height: int | None = None
    cost: float | None = None
    currency: str | None = None


class UnmeteredEvent(NamedTuple):
    """An answer that could carry images but was never received whole: DashScope may
    have generated (and billed) images that no count shows. `reason` is one of
    `proxy.metrics.UNMETERED_REASONS`."""

    key: str
    model: str | None
    route: str
    upstream: str | None
    request_id: str
    task_id: str | None
    reason: str
    timestamp: float


UsageListener = Callable[[UsageEvent], Awaitable[None] | None]
UnmeteredListener = Callable[[UnmeteredEvent], Awaitable[None] | None]


class Meter:
    """Records image counts: the metric first (never lost), then listeners."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.listeners: list[UsageListener] = []
        # Separate from `listeners`: quotas have no count to charge for these.
        self.unmetered_listeners: list[UnmeteredListener] = []

    async def unmetered(
        self,
        *,
        key: str,
        model: str | None,
        route: str,
        upstream: str | None,
        request_id: str,
        reason: str,
        task_id: str | None = None,
    ) -> None:
        """Record an answer nothing could count: the metric, a warning, the listeners."""
        self._metrics.unmetered_answers.labels(reason).inc()
        event = UnmeteredEvent(
            key, model, route, upstream, request_id, task_id, reason, time.time()
        )
        log.warning(
            "metering: an answer was never received whole (%s): DashScope may have generated "
            "images no count shows: %s",
            reason,
            event,
        )
        await _notify(self.unmetered_listeners, event, request_id)

    async def record(
        self,
        *,
        key: str,
        model: str,
        model_label: str,
        images: int,
        route: str,
        upstream: str,
        request_id: str,
        task_id: str | None = None,
        anomaly: str | None = None,
        width: int | None = None,
        height: int | None = None,
        cost: float | None = None,
        currency: str | None = None,
    ) -> None:
        """The image metric, the cost metric when priced (`cost` in `currency`, from the
        price table current now: `proxy.core.pricing`), then the listeners."""
        if images <= 0:
            return
        self._metrics.image_counter(key, model_label).inc(images)
        if cost is not None and currency is not None:
            self._metrics.cost_counter(key, model_label, currency).inc(cost)
        else:
            cost = currency = None
        if anomaly is not None:
            self._metrics.metering_anomalies.labels(anomaly).inc()
            log.warning(
                "metering: %s answer for request %s (task %s) reported no valid image count "
                "(%s); counted the %d image(s) it holds",
                model,
                request_id,
                task_id or "-",
                anomaly,
                images,
            )
        event = UsageEvent(
            key,
            model,
            model_label,
            images,
            route,
            upstream,
            request_id,
            task_id,
            time.time(),
            width,
            height,
            cost,
            currency,
        )
        await _notify(self.listeners, event, request_id)


async def _notify(
    listeners: Sequence[Callable[[Any], Awaitable[None] | None]], event: object, request_id: str
) -> None:
    for listener in list(listeners):
        try:
            result = listener(event)
            if result is not None:
                await result
        except Exception:
            # A broken ledger must not fail the request; the metric is
            # already counted and the failure is loud in the log.
            log.exception("usage listener failed for request %s", request_id)
