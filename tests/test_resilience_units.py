"""Table tests of the pure pieces behind limits and failover: admission decisions, requested
images, UTC windows, the circuit breaker, the per-upstream gate, candidate order, prompt
extraction and bounded metric labels."""

from __future__ import annotations

import asyncio
import calendar
import random

import pytest
from prometheus_client import CollectorRegistry

from proxy.config import LimitsConfig, UpstreamConfig
from proxy.core.input_limits import MAX_PROMPT_CHARS, check_prompts, native_prompts
from proxy.core.limits import requested_images
from proxy.errors import GatewayError
from proxy.metrics import Metrics
from proxy.state.limiter import (
    CONCURRENCY,
    IMAGES_DAY,
    IMAGES_MONTH,
    RESERVED_RETRY_SECONDS,
    RPM,
    TASK_HOLD_SECONDS,
    LocalLimiter,
    decide,
    seconds_to_next_day,
    seconds_to_next_month,
)
from proxy.upstream.health import Breaker, Gate, UpstreamHealth, capacity


@pytest.mark.parametrize(
    ("model", "params", "images"),
    [
        ("wan2.6-t2i", {}, 4),
        ("wan2.6-t2i", None, 4),
        ("wan2.6-t2i", {"n": 2}, 2),
        ("wanx2.1-t2i-turbo", {"n": "3"}, 4),  # not an integer: the model's default
        ("qwen-image-2.0", {}, 1),
        ("qwen-image-2.0", {"n": 6}, 6),
        ("qwen-image-2.0", {"n": True}, 1),
        ("qwen-image-2.0", {"n": 0}, 1),
        ("qwen-image-2.0", {"n": 10**9}, 1000),
        ("wan2.6-image", {"enable_interleave": True}, 5),
        ("wan2.6-image", {"enable_interleave": True, "max_images": 2, "n": 1}, 2),
        ("my-new-model", {}, 1),
    ],
)
def test_requested_images(model: str, params: object, images: int) -> None:
    assert requested_images(model, params) == images


def _decide(limits: LimitsConfig, **counts: object) -> tuple[bool, str | None, int]:
    base: dict[str, object] = {
        "now": 1000.0,
        "recent": 0,
        "oldest": None,
        "inflight": 0,
        "used_day": 0,
        "used_month": 0,
        "reserved": 0,
        "images": 1,
    }
    base.update(counts)
    d = decide(limits, **base)  # type: ignore[arg-type]
    return d.allowed, d.limit, d.retry_after


@pytest.mark.parametrize(
    ("limits", "counts", "expected"),
    [
        (LimitsConfig(), {}, (True, None, 1)),
        (LimitsConfig(requests_per_minute=2), {"recent": 1, "oldest": 990.0}, (True, None, 1)),
        (LimitsConfig(requests_per_minute=2), {"recent": 2, "oldest": 990.0}, (False, RPM, 50)),
        (LimitsConfig(concurrent_requests=1), {"inflight": 1}, (False, CONCURRENCY, 1)),
        (LimitsConfig(images_per_day=5), {"used_day": 4, "images": 1}, (True, None, 1)),
        (
            LimitsConfig(images_per_day=5),
            {"used_day": 4, "images": 2},
            (False, IMAGES_DAY, seconds_to_next_day(1000.0)),
        ),
        # Only reservations of work in flight are in the way: retry soon, not tomorrow.
        (
            LimitsConfig(images_per_day=5),
            {"used_day": 1, "reserved": 3, "images": 2},
            (False, IMAGES_DAY, RESERVED_RETRY_SECONDS),
        ),
        (
            LimitsConfig(images_per_month=3),
            {"used_month": 0, "images": 4},
            (False, IMAGES_MONTH, seconds_to_next_month(1000.0)),
        ),
        (
            LimitsConfig(images_per_day=0),
            {"images": 1},
            (False, IMAGES_DAY, seconds_to_next_day(1000.0)),
        ),
    ],
)
def test_decide(
    limits: LimitsConfig, counts: dict[str, object], expected: tuple[bool, str | None, int]
) -> None:
    assert _decide(limits, **counts) == expected


def test_windows_are_utc_calendar_periods() -> None:
    new_year_eve = calendar.timegm((2025, 12, 31, 23, 59, 30))
    assert seconds_to_next_day(new_year_eve) == 30
    assert seconds_to_next_month(new_year_eve) == 30
    assert seconds_to_next_month(calendar.timegm((2025, 2, 1, 0, 0, 0))) == 28 * 86400


def test_local_limiter_reservations() -> None:
    lim = LocalLimiter()
    limits = LimitsConfig(images_per_day=4, concurrent_requests=2)
    assert lim.admit_now("k", limits, "r1", 4, 0.0).allowed
    refused = lim.admit_now("k", limits, "r2", 1, 0.0)
    assert not refused.allowed and refused.limit == IMAGES_DAY and refused.reserved == 4
    lim.hold_now("k", "r1", "task", 0.0)  # the async submit was accepted
    lim.release("k", "r1")  # the request ended; the task keeps the reservation
    assert not lim.admit_now("k", limits, "r3", 1, 1.0).allowed
    assert lim.admit_now("k", limits, "r4", 1, TASK_HOLD_SECONDS + 1).allowed  # it lapsed
    lim.release("k", "r4")
    lim.hold_now("k", "r5-never-admitted", "t2", 0.0)  # nothing to move: no effect
    assert lim.add_usage("k", 3, ["t:task"], TASK_HOLD_SECONDS + 2) == (3, 3)
    assert not lim.admit_now("k", limits, "r6", 2, TASK_HOLD_SECONDS + 2).allowed
    assert lim.admit_now("k", limits, "r7", 1, TASK_HOLD_SECONDS + 2).allowed


def test_breaker_opens_probes_and_closes() -> None:
    b = Breaker()
    assert not b.failure(3, 10.0, 0.0) and not b.failure(3, 10.0, 0.0)
    assert b.closed and b.available(0.0)
    assert b.failure(3, 10.0, 1.0)  # third in a row: opens
    assert not b.available(5.0) and not b.begin(5.0) and b.retry_in(5.0) == 6.0
    assert b.begin(11.0)  # cooled down: one probe
    assert not b.begin(11.0) and not b.available(11.0)  # only one
    b.failure(3, 10.0, 12.0)  # the probe failed: open again
    assert not b.closed and not b.available(20.0) and b.begin(22.0)
    b.abandon()  # a cancelled probe lets another one try
    assert b.begin(22.0)
    assert b.success() and b.closed and b.failures == 0
    assert not b.success()


async def test_gate_fifo_timeout_and_dynamic_cap() -> None:
    g = Gate()
    assert g.try_enter(1) and not g.try_enter(1)
    assert not await g.enter(1, 0.05)  # timed out, and left no waiter behind
    order: list[str] = []

    async def waiter(name: str) -> None:
        assert await g.enter(1, 5)
        order.append(name)

    tasks = [asyncio.create_task(waiter(n)) for n in ("a", "b")]
    await asyncio.sleep(0.01)
    assert not g.try_enter(5)  # waiters first, even under a larger cap
    g.leave()
    await asyncio.sleep(0.01)
    assert order == ["a"]
    g.leave()
    await asyncio.gather(*tasks)
    assert order == ["a", "b"] and g.inflight == 1
    g.leave()
    assert g.inflight == 0


async def test_gate_cancelled_waiter_passes_its_slot_on() -> None:
    g = Gate()
    assert g.try_enter(1)
    first = asyncio.create_task(g.enter(1, 5))
    second = asyncio.create_task(g.enter(1, 5))
    await asyncio.sleep(0.01)
    first.cancel()
    g.leave()
    assert await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert g.inflight == 1


def _up(name: str, priority: int = 0, weight: int = 1, **kw: object) -> UpstreamConfig:
    return UpstreamConfig(
        name=name, base_url="http://x/api/v1", api_key="k", priority=priority, weight=weight, **kw
    )  # type: ignore[arg-type]


def test_order_by_priority_then_weight() -> None:
    health = UpstreamHealth(Metrics(CollectorRegistry()), random.Random(3))
    ups = [_up("a", 0, 9), _up("b", 0, 1), _up("c", 5)]
    firsts = [health.order(ups, pinned=False)[0].name for _ in range(400)]
    assert 300 < firsts.count("a") < 400 and firsts.count("b") > 0 and "c" not in firsts
    assert all(health.order(ups, pinned=False)[-1].name == "c" for _ in range(20))
    assert [u.name for u in health.order(ups, pinned=True)] == ["a", "b", "c"]
    assert capacity(_up("d", max_connections=10, max_concurrency=3)) == 3
    assert capacity(_up("e", max_connections=2, max_concurrency=30)) == 2


def test_native_prompts_and_the_prompt_cap() -> None:
    body = {
        "input": {
            "prompt": "p",
            "negative_prompt": "n",
            "messages": [
                {"role": "user", "content": [{"text": "t1"}, {"image": "x" * 10**6}]},
                {"content": "t2"},
                "junk",
                {"content": 5},
            ],
        },
        "parameters": {"negative_prompt": "pn"},
    }
    assert list(native_prompts(body)) == ["p", "n", "pn", "t1", "t2"]
    check_prompts({"input": {"prompt": "x" * MAX_PROMPT_CHARS}})
    with pytest.raises(GatewayError) as err:
        check_prompts(
            {
                "input": {
                    "messages": [{"content": [{"text": "x" * MAX_PROMPT_CHARS}, {"text": "y"}]}]
                }
            }
        )
    assert err.value.status == 400 and "too long" in err.value.message
    for junk in ({}, {"input": 5}, {"input": {"messages": "x"}}, {"parameters": []}):
        check_prompts(junk)


def test_upstream_error_codes_are_a_bounded_label() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for i in range(500):
        metrics.upstream_errors.labels("u", f"Code.{i}").inc()
    metrics.upstream_errors.labels("u", "not a code!").inc()
    codes = {
        s.labels["code"]
        for fam in registry.collect()
        for s in fam.samples
        if fam.name == "dashscope_proxy_upstream_errors"
    }
    assert len(codes) == 65 and "other" in codes
    assert (
        registry.get_sample_value(
            "dashscope_proxy_upstream_errors_total", {"upstream": "u", "code": "other"}
        )
        == 437
    )
