"""Every Prometheus metric the gateway exports, built on an injected registry.

Names and labels are a contract (dashboards and alerts use them; docs/metering.md
lists them). Label values come only from closed sets: key and upstream names from
the config, routes from the code, and models through `ModelLabels` (configured or
seen succeeding upstream, else `other`). No label ever holds a secret, a prompt, a
task id or a raw path.

Children are cached per label tuple so the hot path does one dict lookup
instead of prometheus_client's label validation on every request.

With `server.workers > 1` every worker runs prometheus_client's multiprocess
mode (values in per-process mmap files under a per-run directory the
supervisor creates): `/metrics` on any worker then shows the sum over all
workers, and counters of a worker that died keep their counts. Every Gauge
therefore declares how workers combine (`multiprocess_mode`); the mode is
ignored in a single process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from proxy import __version__
from proxy.catalogue import TABLE

# Image generation takes seconds to minutes; the tail needs buckets up to 10 min.
_SUB_MINUTE = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45)
REQUEST_BUCKETS = (*_SUB_MINUTE, 60, 90, 120, 180, 300, 600)

OTHER = "other"
ANONYMOUS = "anonymous"

# Model names DashScope documents for images (the catalogue); always valid label values.
KNOWN_MODELS = tuple(TABLE)

# Why an answer's image count had to be inferred (`metering_anomalies{reason}`).
ANOMALY_REASONS = ("no_count_field", "invalid_count_field")
# Why an answer that could carry images was never received whole, so nothing could
# count them (`unmetered_answers{reason}`). A process killed mid-request (SIGKILL, OOM)
# is the one such case no process lives to count.
UNMETERED_REASONS = ("read_timeout", "truncated", "invalid_json", "drain_cut")
# How a background reconciler poll ended (`reconciler_polls{outcome}`).
RECONCILE_OUTCOMES = ("running", "succeeded", "ended", "unknown", "error")

# A model label must look like a model name; anything else is `other` even if
# the upstream accepted it.
_MODEL_SHAPE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ModelLabels:
    """Maps a requested model name to a bounded label value."""

    def __init__(
        self, configured: Iterable[str], max_seen: int = 256, seen: Iterable[str] = ()
    ) -> None:
        self._known = {m for m in configured if _MODEL_SHAPE.match(m)} | set(KNOWN_MODELS)
        self._max_seen = max_seen
        self._seen = set(list(seen)[:max_seen])
        self._known |= self._seen

    def label(self, model: str | None) -> str:
        if model and model in self._known:
            return model
        return OTHER

    def seen_succeeding(self, model: str) -> None:
        """An upstream answered 2xx for `model`: it is a real model, label it by name."""
        if (
            model not in self._known
            and len(self._seen) < self._max_seen
            and _MODEL_SHAPE.match(model)
        ):
            self._seen.add(model)
            self._known.add(model)

    def reconfigured(self, configured: Iterable[str]) -> ModelLabels:
        """Labels for a reloaded config that keep the models already seen succeeding."""
        return ModelLabels(configured, self._max_seen, self._seen)


class Metrics:
    """The gateway's metrics on one registry (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry, multiprocess_dir: str | None = None) -> None:
        # `_created` series double the exposition for no dashboard use.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        # What /metrics serves: this registry, or every worker's values.
        self.exposition = registry
        if multiprocess_dir is not None:
            self.exposition = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.exposition, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        # Standard process metrics (RSS, open descriptors, CPU: the capacity docs size
        # by descriptors) on what /metrics serves. With several workers they describe
        # the worker that answered the scrape.
        ProcessCollector(registry=self.exposition)
        self.build_info = Gauge(
            "dashscope_proxy_build_info",
            "Always 1; the version of the gateway serving, as a label.",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.requests = Counter(
            "dashscope_proxy_requests_total",
            "Requests answered by the gateway.",
            ["route", "key", "model", "code"],
            registry=registry,
        )
        self.images = Counter(
            "dashscope_proxy_images_total",
            "Images DashScope reported generated (usage.image_count), by key and model.",
            ["key", "model"],
            registry=registry,
        )
        self.cost = Counter(
            "dashscope_proxy_cost_total",
            "What the images cost under the config's pricing (in `currency`), by key and model; "
            "unpriced images are not in it.",
            ["key", "model", "currency"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "dashscope_proxy_request_duration_seconds",
            "Time from request received to response finished.",
            ["route", "model"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "dashscope_proxy_upstream_request_duration_seconds",
            "Time from sending a request to DashScope to its response headers.",
            ["upstream", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = BoundedCodes(
            Counter(
                "dashscope_proxy_upstream_errors_total",
                "Failed upstream calls, by DashScope error code or transport failure kind.",
                ["upstream", "code"],
                registry=registry,
            )
        )
        self.inflight = Gauge(
            "dashscope_proxy_inflight_requests",
            "Requests being handled now.",
            ["route"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "dashscope_proxy_config_reloads_total",
            "Config reload attempts (SIGHUP or file change), by result: success | failure.",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        # Both gauges are set when the first config loads, as Prometheus does.
        self.config_last_success = Gauge(
            "dashscope_proxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load or reload.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_last_ok = Gauge(
            "dashscope_proxy_config_last_reload_successful",
            "1 if the last config reload succeeded (or none was tried), 0 if it was rejected.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.usage_log_errors = Counter(
            "dashscope_proxy_usage_log_errors_total",
            "Usage ledger lines that could not be written (the image metric still counted them).",
            registry=registry,
        )
        # Resilience (proxy.upstream.failover, proxy.core.limits, proxy.state.local). Every label
        # comes from the config (upstream and key names) or a closed set.
        self.upstream_up = Gauge(
            "dashscope_proxy_upstream_up",
            "1 while the upstream's circuit breaker is closed, 0 while it is open or probing.",
            ["upstream"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.upstream_failovers = Counter(
            "dashscope_proxy_upstream_failovers_total",
            "Requests moved from an upstream to the next candidate, by reason: connect | "
            "connect_timeout | throttled | unavailable | circuit_open | busy.",
            ["from_upstream", "reason"],
            registry=registry,
        )
        self.limit_rejections = Counter(
            "dashscope_proxy_limit_rejections_total",
            "Requests refused with 429 by a per-key limit, by limit name.",
            ["key", "limit"],
            registry=registry,
        )
        self.quota_remaining = Gauge(
            "dashscope_proxy_quota_remaining_images",
            "Images a key may still generate in the current UTC day or month (window).",
            ["key", "window"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.state_backend_up = Gauge(
            "dashscope_proxy_state_backend_up",
            "1 while the shared state backend (Redis) answers; 0 while the gateway serves "
            "from its local fallback. Always 1 with the local backend.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.state_fallbacks = Counter(
            "dashscope_proxy_state_fallbacks_total",
            "State operations served by the local fallback because Redis was unreachable, "
            "by operation: limits | usage | tasks.",
            ["operation"],
            registry=registry,
        )
        self.metering_anomalies = Counter(
            "dashscope_proxy_metering_anomalies_total",
            "Successful answers whose image count was inferred from the images they hold "
            "because usage carried no valid image_count / output_image_count, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in ANOMALY_REASONS:
            self.metering_anomalies.labels(reason)
        self.unmetered_answers = Counter(
            "dashscope_proxy_unmetered_answers_total",
            "Generation answers and task polls that could carry images but were never "
            "received whole, so no count shows what DashScope may have generated, by "
            "reason: read_timeout | truncated | invalid_json | drain_cut.",
            ["reason"],
            registry=registry,
        )
        # At 0 from the start: increase() and the alert see the first one.
        for reason in UNMETERED_REASONS:
            self.unmetered_answers.labels(reason)
        self.metering_doubles = Counter(
            "dashscope_proxy_metering_doubles_total",
            "Tasks whose images were counted twice: a replica counted one during a Redis "
            "outage that another replica had counted too (a network partition), or a stalled "
            "claim was finished by another process. Each is also logged with the task id.",
            registry=registry,
        )
        self.metering_claims_finished = Counter(
            "dashscope_proxy_metering_claims_finished_total",
            "Metering claims left pending by a process that died, finished by another: "
            "counted now, or found already in the usage log.",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("counted", "already_in_ledger"):
            self.metering_claims_finished.labels(outcome)
        self.reconciler_polls = Counter(
            "dashscope_proxy_reconciler_polls_total",
            "Task polls the gateway made by itself (tasks nobody polled), by upstream and "
            "outcome: running | succeeded | ended | unknown | error. Never counted against "
            "a key's rate limit.",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.reconciler_backlog = Gauge(
            "dashscope_proxy_reconciler_due_tasks",
            "Recorded tasks not yet final whose background poll is due, as last seen.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.idempotent_replays = Counter(
            "dashscope_proxy_idempotent_replays_total",
            "Requests answered with the kept answer of an earlier request with the same "
            "Idempotency-Key (no upstream call, no count, no limit used).",
            ["key"],
            registry=registry,
        )
        self.state_backend_up.set(1)
        # The children the request path touches, cached per label values.
        self._requests_of = Children(self.requests)
        self._durations_of = Children(self.request_duration)
        self.image_counter = Children(self.images)
        self.cost_counter = Children(self.cost)
        self.inflight_gauge = Children(self.inflight)
        self.quota_left = SetWhenChanged(self.quota_remaining)
        self.upstream_timer = Children(self.upstream_duration)

    def config_loaded(self, when: float) -> None:
        """A config was loaded (at startup) or reloaded successfully at `when`."""
        self.config_last_success.set(when)
        self.config_last_ok.set(1)

    def config_reloaded(self, ok: bool, when: float) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.config_loaded(when)
        else:
            self.config_last_ok.set(0)

    def precreate(self, key_names: Iterable[str], models: Iterable[str]) -> None:
        """Series for configured keys exist at 0 so dashboards and rate() see them at once."""
        for key in key_names:
            self.idempotent_replays.labels(key)
            for model in models:
                self.image_counter(key, model)

    def count_request(self, route: str, key: str, model: str, code: int, seconds: float) -> None:
        self._requests_of(route, key, model, str(code)).inc()
        self._durations_of(route, model).observe(seconds)

    def precreate_cost(
        self, key_names: Iterable[str], models: Iterable[str], currency: str
    ) -> None:
        """Cost series of configured keys and priced models exist at 0 (as `precreate`)."""
        wanted = list(models)
        for key in key_names:
            for model in wanted:
                self.cost_counter(key, model, currency)


M = TypeVar("M", bound=MetricWrapperBase)


class SetWhenChanged:
    """A labelled gauge whose children are set only when their value changes: the
    remaining-quota gauge is set twice per metered request (at admission and when the
    images are counted) and most of those sets repeat the value already there.
    Only this process sets it (with several workers each keeps its own value)."""

    __slots__ = ("_children", "_last")

    def __init__(self, gauge: Gauge) -> None:
        self._children = Children(gauge)
        self._last: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        if self._last.get(labels) != value:
            self._last[labels] = value
            self._children(*labels).set(value)


class Children(Generic[M]):
    """A labelled metric's children, cached per label values: `labels()` validates and
    looks its arguments up on every call, and the request path asks several per request."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self._metric.labels(*labels)
        return child


class BoundedCodes:
    """`upstream_errors` with a bounded `code` label.

    The code comes from upstream bodies, so it is not a closed set by
    construction: the first `cap` distinct values shaped like a DashScope code
    (`Throttling.RateQuota`) or a transport kind keep their name, anything
    else is `other`. Only `.labels(upstream, code)` is offered.
    """

    _SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    def __init__(self, counter: Counter, cap: int = 64) -> None:
        self.counter = counter
        self._cap = cap
        self._codes: set[str] = set()

    def labels(self, upstream: str, code: str) -> Counter:
        if code not in self._codes:
            if len(self._codes) < self._cap and self._SHAPE.match(code):
                self._codes.add(code)
            else:
                code = OTHER
        return self.counter.labels(upstream, code)
