"""The fast paths behave exactly like the slow ones they replaced (docs/performance.md)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.auth import KeyRing
from proxy.config import KeyConfig, LimitsConfig, sha256_hex
from proxy.core.spend import spend_caps
from proxy.errors import GatewayError
from proxy.metering import PARSE_LIMIT, BodySniffer, UsageEvent, facts_from_bytes
from proxy.metrics import Metrics
from proxy.ops.accesslog import AccessLog, rfc3339
from proxy.ops.ledger import UsageLedger
from proxy.runtime import RequestContext
from proxy.state.limiter import (
    TASK_HOLD_SECONDS,
    LocalLimiter,
    current_periods,
    day_period,
    has_limits,
    month_period,
)
from proxy.state.local import LocalStore, PersistedLimiter


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 99),
    status=st.sampled_from(["PENDING", "RUNNING", "SUCCEEDED"]),
    usage_first=st.booleans(),
    indent=st.sampled_from([None, 1]),
    pad=st.integers(PARSE_LIMIT - 1000, PARSE_LIMIT + 300_000),
    structure=st.integers(0, 40),
    sizes=st.lists(
        st.sampled_from([1, 7, 255, 256, 257, 4096, 65536, 100_000]), min_size=1, max_size=8
    ),
)
def test_body_sniffer_agrees_with_a_full_parse(
    count: int,
    status: str,
    usage_first: bool,
    indent: int | None,
    pad: int,
    structure: int,
    sizes: list[int],
) -> None:
    output = {
        "task_id": "9c1e-task",
        "task_status": status,
        "pad": "A" * pad,
        "choices": [{"finish_reason": "stop"}] * structure,
    }
    usage = {"image_count": count}
    obj = {"usage": usage, "output": output} if usage_first else {"output": output, "usage": usage}
    body = json.dumps(obj, indent=indent).encode()
    sniffer = BodySniffer()
    i = n = 0
    while i < len(body):
        step = sizes[n % len(sizes)]
        sniffer.feed(body[i : i + step])
        i, n = i + step, n + 1
    got, want = sniffer.facts(), facts_from_bytes(body)
    assert (got.image_count, got.task_id, got.task_status) == (
        want.image_count,
        want.task_id,
        want.task_status,
    )


def test_the_cached_rfc3339_formats_like_strftime() -> None:
    now = time.time()
    # Repeats, neighbours and out-of-order seconds all go through the per-second cache.
    stamps = [now, now + 0.9996, now + 1, 0.0, 1.5, 1763780000.0004, now, now - 3600.25, now + 1]
    for ts in stamps:
        whole = int(ts)
        want = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        assert rfc3339(ts) == f"{want}.{min(int((ts - whole) * 1000), 999):03d}Z"


def test_the_access_log_line_carries_an_rfc3339_timestamp() -> None:
    out = io.BytesIO()
    before = time.time()
    AccessLog(out).write(RequestContext(request_id="r", route="x"), "POST", 200, 0.01, False)
    ts = json.loads(out.getvalue())["ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    assert rfc3339(before)[:19] <= ts[:19] <= rfc3339(time.time())[:19]


def test_keyring_memoised_allowlist_answers_like_the_globs() -> None:
    keys = [
        KeyConfig("a", sha256_hex("secret-a-0001"), ("qwen-image*",)),
        KeyConfig("b", sha256_hex("secret-b-0002")),
    ]
    ring = KeyRing(keys)
    a = ring.authenticate("Bearer secret-a-0001")
    assert a.name == "a" and ring.authenticate("bearer  secret-b-0002").name == "b"
    for model in ("qwen-image-plus", "wan2.6-t2i", "qwen-image-plus", "wan2.6-t2i"):
        try:
            ring.check_allowed(a, model)
            cached = True
        except GatewayError:
            cached = False
        direct = a.allows(model)  # the glob match the cache memoises
        assert cached == direct == model.startswith("qwen-image")
    with pytest.raises(GatewayError):
        ring.authenticate("Bearer secret-a-0002")


async def test_ledger_batches_concurrent_lines_whole_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    ledger = UsageLedger(str(path), Metrics(CollectorRegistry()))
    await ledger.open()

    def event(i: int) -> UsageEvent:
        return UsageEvent(
            "team-a",
            "qwen-image-plus",
            "qwen-image-plus",
            1,
            "route",
            "up",
            f"req-{i:05d}",
            None,
            time.time(),
        )

    await asyncio.gather(*(ledger(event(i)) for i in range(500)))
    # Lines still queued when the app shuts down are written before the file closes.
    pending = [asyncio.ensure_future(ledger(event(i))) for i in range(500, 600)]
    await asyncio.sleep(0)
    await ledger.close()
    await asyncio.gather(*pending)
    lines = path.read_bytes().splitlines()
    ids = [json.loads(line)["request_id"] for line in lines]
    assert ids == [f"req-{i:05d}" for i in range(600)]


async def test_ledger_appends_inline_until_a_write_is_slow_then_from_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "usage.jsonl"
    ledger = UsageLedger(str(path), Metrics(CollectorRegistry()))
    await ledger.open()
    # None: in the kernel before returning (no future, no await).
    assert ledger._submit(b'{"n": 0}\n') is None
    assert path.read_bytes() == b'{"n": 0}\n'
    # A rotation: the inline path leaves it to the thread, which opens the new file.
    path.rename(tmp_path / "usage.jsonl.1")
    rotated = ledger._submit(b'{"n": 1}\n')
    assert rotated is not None and not rotated.done()
    await rotated
    assert path.read_bytes() == b'{"n": 1}\n'
    # A write slower than the budget: appends move to the thread for the back-off.
    monkeypatch.setattr("proxy.ops.ledger.INLINE_SECONDS", -1.0)
    assert ledger._submit(b'{"n": 2}\n') is None  # written, but it starts the back-off
    monkeypatch.setattr("proxy.ops.ledger.INLINE_SECONDS", 10.0)
    after = [ledger._submit(f'{{"n": {i}}}\n'.encode()) for i in range(3, 6)]
    queued = [f for f in after if f is not None]
    assert len(queued) == 3 and not any(f.done() for f in queued)
    await asyncio.gather(*queued)
    await ledger.close()
    assert [json.loads(x)["n"] for x in path.read_bytes().splitlines()] == [1, 2, 3, 4, 5]


class _SlowSyncLedger(UsageLedger):
    """A real ledger on a real file whose fsync takes 0.2 s longer (a busy disk), noting
    for every append whether it ran on the event loop and whether an fsync was running."""

    def __init__(self, path: str) -> None:
        super().__init__(path, Metrics(CollectorRegistry()), fsync_seconds=0.3)
        self.in_sync = threading.Event()
        self.appends: list[tuple[str, bool]] = []

    def _sync(self) -> None:
        self.in_sync.set()
        try:
            time.sleep(0.2)
            super()._sync()
        finally:
            self.in_sync.clear()

    def _append_inline(self, data: bytes) -> int | None:
        self.appends.append(("loop", self.in_sync.is_set()))
        return super()._append_inline(data)

    def _append_batch(self, data: bytes) -> int:
        self.appends.append(("thread", self.in_sync.is_set()))
        return super()._append_batch(data)


async def test_ledger_never_appends_from_the_loop_during_an_fsync_and_returns_to_it_after(
    tmp_path: Path,
) -> None:
    # An fsync's journal commit can hold a concurrent write() for milliseconds: the loop
    # would stall, and the ledger would take it for a slow disk and leave the loop for
    # its back-off. Lines metered during an fsync wait for the thread instead, and the
    # appends after it run on the loop again.
    path = tmp_path / "usage.jsonl"
    ledger = _SlowSyncLedger(str(path))
    await ledger.open()
    n = 0
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        await ledger(
            UsageEvent("team-a", "m", "m", 1, "route", "up", f"req-{n:05d}", None, time.time())
        )
        n += 1
        await asyncio.sleep(0.002)
    await ledger.close()
    assert ("loop", True) not in ledger.appends  # no append from the loop during an fsync
    first_hop = [where for where, _ in ledger.appends].index("thread")  # during an fsync
    assert ("loop", False) in ledger.appends[first_hop:]  # and back on the loop after it
    assert ledger._inline_after == 0.0  # no back-off was started
    ids = [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()]
    assert ids == [f"req-{i:05d}" for i in range(n)]


async def test_ledger_to_a_pipe_goes_through_the_thread_in_batches(tmp_path: Path) -> None:
    fifo = tmp_path / "usage.fifo"
    os.mkfifo(fifo)
    received = bytearray()

    def read_all() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(65536):
                received.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    ledger = UsageLedger(str(fifo), Metrics(CollectorRegistry()))
    await ledger.open()
    events = [
        UsageEvent("team-a", "m", "m", 1, "route", "up", f"req-{i:05d}", None, time.time())
        for i in range(300)
    ]
    await asyncio.gather(*(ledger(e) for e in events))
    await ledger.close()
    reader.join(5)
    ids = [json.loads(line)["request_id"] for line in bytes(received).splitlines()]
    assert ids == [f"req-{i:05d}" for i in range(300)]


@settings(max_examples=300, deadline=None)
@given(
    ts=st.one_of(
        st.floats(-2e9, 4e9, allow_nan=False),
        # Either side of a UTC midnight, and a month's first second.
        st.integers(-20_000, 40_000).map(lambda d: d * 86400.0),
        st.integers(-20_000, 40_000).map(lambda d: d * 86400.0 - 0.001),
    )
)
def test_cached_periods_are_the_utc_day_and_month(ts: float) -> None:
    assert day_period(ts) == time.strftime("%Y%m%d", time.gmtime(ts))
    assert month_period(ts) == time.strftime("%Y%m", time.gmtime(ts))
    day, month = time.strftime("%Y%m%d", time.gmtime(ts)), time.strftime("%Y%m", time.gmtime(ts))
    assert current_periods(ts) == ("d:" + day, "m:" + month)


class _TimedStore(LocalStore):
    """The real store; remembers when each batch of quota usage went to SQLite."""

    writes: list[float]

    async def add_usage_rows(self, usage: dict[tuple[str, str], int]) -> None:
        self.writes.append(time.monotonic())
        await super().add_usage_rows(usage)


async def test_quota_usage_is_written_in_batches_under_steady_metering(tmp_path: Path) -> None:
    """Steady metering for 1 s with a 0.1 s linger: one write per linger (each write
    lingers first, not only the first one), and every image on disk at the end."""
    store = _TimedStore(str(tmp_path / "state.db"))
    store.writes = []
    await store.open()
    limiter = PersistedLimiter(store)
    limiter.FLUSH_LINGER_SECONDS = 0.1
    try:
        start, images = time.monotonic(), 0
        while time.monotonic() - start < 1.0:
            await limiter.record_usage("k", 1, [f"r{images}"], time.time())
            images += 1
            await asyncio.sleep(0.0005)
        await limiter.close()
        day = current_periods(time.time())[0]
        assert (await store.load_usage([day]))[("k", day)] == images
        gaps = [b - a for a, b in zip(store.writes, store.writes[1:], strict=False)]
        assert 5 <= len(store.writes) <= 13, (len(store.writes), images)
        assert min(gaps[:-1]) >= 0.09, gaps  # the last one is close()'s, at once
    finally:
        await store.close()


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "release", "hold", "settle", "usage", "wait"]),
            st.integers(0, 30),  # which request / task
            st.integers(1, 4),  # images
        ),
        max_size=120,
    )
)
def test_the_reserved_sum_is_what_a_scan_of_the_reservations_gives(
    ops: list[tuple[str, int, int]],
) -> None:
    """The limiter keeps the reserved images as a running sum with expiring task holds;
    after any sequence of admissions, releases, task holds (which lapse after
    TASK_HOLD_SECONDS), settlements and metered usage it equals summing what a plain
    dict of live reservations holds, as every admission sees it."""
    limits = LimitsConfig(images_per_day=10**9)
    lim = LocalLimiter()
    model: dict[str, tuple[int, float]] = {}  # token -> (images, expiry)
    now = 1_800_000_000.0

    def live() -> int:
        return sum(n for n, exp in model.values() if exp > now)

    for op, i, images in ops:
        token, task = f"r{i}", f"t:task{i}"
        if op == "admit":
            decision = lim.admit_now("k", limits, token, images, now)
            assert decision.allowed and decision.reserved == live()
            model[token] = (images, math.inf)
        elif op == "release":
            lim.release("k", token)
            model.pop(token, None)
        elif op == "hold":
            lim.hold_now("k", token, f"task{i}", now)
            held = model.pop(token, None)
            if held is not None:
                model[task] = (held[0], now + TASK_HOLD_SECONDS)
        elif op == "settle":
            asyncio.run(lim.settle_task("k", f"task{i}"))
            model.pop(task, None)
        elif op == "usage":
            lim.add_usage("k", images, [token, task], now)
            model.pop(token, None)
            model.pop(task, None)
        else:
            now += TASK_HOLD_SECONDS * images / 3
        assert lim.reserved_now("k", now) == live()


_cap = st.one_of(st.none(), st.integers(1, 10**9))


@settings(max_examples=200, deadline=None)
@given(rpm=_cap, conc=_cap, day=_cap, month=_cap, spend=st.one_of(st.none(), st.floats(0.01, 1e6)))
def test_limits_answers_memoised_by_identity_match_a_fresh_computation(
    rpm: int | None, conc: int | None, day: int | None, month: int | None, spend: float | None
) -> None:
    # has_limits / spend_caps are memoised per config object: equal objects made
    # separately (a reload) must get the same answers, each its own.
    def make() -> LimitsConfig:
        return LimitsConfig(
            requests_per_minute=rpm,
            concurrent_requests=conc,
            images_per_day=day,
            images_per_month=month,
            spend_per_day=spend,
        )

    first, second = make(), make()
    expected = any(v is not None for v in (rpm, conc, day, month))
    for limits in (first, second, first):
        assert has_limits(limits) is expected
        caps = spend_caps(limits)
        assert (caps is None) == (spend is None)
        if caps is not None:
            assert caps.images_per_day == spend_caps(make()).images_per_day  # type: ignore[union-attr]


_pattern = st.sampled_from(["qwen-image*", "qwen-image-plus", "wan2.6-*", "wan*", "*-t2i", "flux"])
_model = st.sampled_from(["qwen-image", "qwen-image-plus", "wan2.6-t2i", "wanx-v1", "flux", "x"])


@settings(max_examples=200, deadline=None)
@given(patterns=st.lists(_pattern, max_size=8), models=st.lists(_model, min_size=1, max_size=6))
def test_price_entries_memoised_per_table_match_a_plain_scan(
    patterns: list[str], models: list[str]
) -> None:
    # price_entry remembers, per price table object, the entry of each model asked: it
    # must answer what scanning the table (the model, then its family) answers, for
    # equal tables made separately too (a reload).
    from fnmatch import fnmatchcase

    from proxy.catalogue import family
    from proxy.config.model import ModelPrice, PricingConfig
    from proxy.core.pricing import price_entry

    def table() -> PricingConfig:
        return PricingConfig(
            models=tuple(ModelPrice(p, 0.01 * (i + 1)) for i, p in enumerate(patterns))
        )

    def scan(pricing: PricingConfig, model: str) -> ModelPrice | None:
        for name in (model, family(model)):
            for entry in pricing.models:
                if fnmatchcase(name, entry.pattern):
                    return entry
        return None

    first, second = table(), table()
    for pricing in (first, second, first):
        for model in models:
            assert price_entry(pricing, model) == scan(pricing, model)


def test_upstream_urls_are_parsed_once_and_a_bad_one_is_left_to_aiohttp() -> None:
    # The parsed URL is shared by every request to the same path; one yarl cannot parse
    # stays a string, so aiohttp reports it as a transport failure, as it always did.
    from types import SimpleNamespace
    from typing import cast

    from yarl import URL

    from proxy.config.model import UpstreamConfig
    from proxy.upstream.call import upstream_url

    good = cast(UpstreamConfig, SimpleNamespace(base_url="http://127.0.0.1:1/api/v1"))
    first = upstream_url(good, "/services/aigc/x")
    assert isinstance(first, URL) and str(first) == "http://127.0.0.1:1/api/v1/services/aigc/x"
    assert upstream_url(good, "/services/aigc/x") is first
    bad = cast(UpstreamConfig, SimpleNamespace(base_url="http://h:99999/api/v1"))
    assert upstream_url(bad, "/services/aigc/x") == "http://h:99999/api/v1/services/aigc/x"
