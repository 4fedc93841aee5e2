"""`timeouts.total` of generation calls (proxy.upstream.deadline): a 504 while DashScope has
not answered, a cut stream while its answer is read, never a timeout for a cancellation from
elsewhere, and no deadline left behind by a call that ended."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import requests

from proxy.simulator import SimSettings, create_sim_app
from proxy.upstream.deadline import DEADLINES, Deadlines
from tests.conftest import GatewayFactory
from tests.resilience_support import MM, A, body, config_yaml, upstream_yaml
from tests.support import Live, LoopThread

ERRORS = "dashscope_proxy_upstream_errors_total"
SSE = {"X-DashScope-SSE": "enable", "Accept": "text/event-stream"}


def _interleave() -> dict[str, object]:
    return {
        "model": "wan2.6-image",
        "input": {"messages": [{"role": "user", "content": [{"text": "a tutorial"}]}]},
        "parameters": {"enable_interleave": True, "max_images": 3, "size": "1280*1280"},
    }


def test_total_runs_out_before_dashscope_answers_504_and_the_next_call_is_untouched(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    # `read` alone would wait 3 s for the slow answer: only `total` can end it.
    upstream = upstream_yaml(
        "up", sim.url, extra="timeouts: {read: 5, total: 0.5}\ncircuit_breaker: {failures: 1000}"
    )
    gw = start_gateway(yaml_text=config_yaml([upstream], tmp_path / "s.db"))
    for attempt in range(1, 4):
        t0 = time.monotonic()
        r = requests.post(gw.url + MM, json=body("[sim:slow=3]"), headers=A, timeout=10)
        assert r.status_code == 504 and r.json()["code"] == "GatewayTimeout", r.text
        assert time.monotonic() - t0 < 2.0
        assert gw.metric(ERRORS, upstream="up", code="timeout") == attempt
    assert gw.images("team-a", "qwen-image-2.0") == 0
    # A quick call after them: no deadline of theirs cancels it, and it is counted.
    r = requests.post(gw.url + MM, json=body(), headers=A, timeout=10)
    assert r.status_code == 200, r.text
    assert gw.images("team-a", "qwen-image-2.0") == 1
    gw.settled()
    assert len(gw.live.app[DEADLINES]) == 0


def test_total_runs_out_while_the_answer_streams_the_stream_is_cut(
    start_gateway: GatewayFactory, tmp_path: Path, loop_thread: LoopThread
) -> None:
    # Events 0.4 s apart: never silent for `read` (2 s), but longer than `total` (1 s).
    slow = loop_thread.serve(create_sim_app(SimSettings(sse_event_delay_seconds=0.4)))
    try:
        upstream = upstream_yaml("up", slow.url, extra="timeouts: {read: 2, total: 1}")
        gw = start_gateway(yaml_text=config_yaml([upstream], tmp_path / "s.db"))
        events, t0 = 0, time.monotonic()
        try:
            with requests.post(
                gw.url + MM, json=_interleave(), headers={**A, **SSE}, stream=True, timeout=10
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    events += line.startswith(b"data:")
        except requests.RequestException:
            pass  # the connection is closed: the client sees a truncated stream
        assert events >= 1
        assert time.monotonic() - t0 < 3.0
        assert gw.metric(ERRORS, upstream="up", code="timeout") == 1
        assert gw.images("team-a", "wan2.6-image") == 0
        gw.settled()
        assert len(gw.live.app[DEADLINES]) == 0
    finally:
        loop_thread.stop(slow)


def test_read_runs_out_before_dashscope_answers_504(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    upstream = upstream_yaml(
        "up", sim.url, extra="timeouts: {read: 0.4, total: 30}\ncircuit_breaker: {failures: 1000}"
    )
    gw = start_gateway(yaml_text=config_yaml([upstream], tmp_path / "s.db"))
    t0 = time.monotonic()
    r = requests.post(gw.url + MM, json=body("[sim:slow=3]"), headers=A, timeout=10)
    assert r.status_code == 504 and r.json()["code"] == "GatewayTimeout", r.text
    assert time.monotonic() - t0 < 2.0
    assert gw.metric(ERRORS, upstream="up", code="timeout") == 1


def test_an_answer_that_keeps_coming_outlasts_read_and_is_whole(
    start_gateway: GatewayFactory, tmp_path: Path, loop_thread: LoopThread
) -> None:
    # Events 0.3 s apart for longer than `read` (0.5 s): the wait's `read` deadline passes
    # while the answer streams, and must not cut it (aiohttp's read follows the bytes).
    slow = loop_thread.serve(create_sim_app(SimSettings(sse_event_delay_seconds=0.3)))
    try:
        upstream = upstream_yaml("up", slow.url, extra="timeouts: {read: 0.5, total: 30}")
        gw = start_gateway(yaml_text=config_yaml([upstream], tmp_path / "s.db"))
        t0 = time.monotonic()
        with requests.post(
            gw.url + MM, json=_interleave(), headers={**A, **SSE}, stream=True, timeout=10
        ) as r:
            assert r.status_code == 200
            events = sum(line.startswith(b"data:") for line in r.iter_lines())
        assert time.monotonic() - t0 > 0.5  # it did outlast `read`
        assert events >= 3
        assert gw.images("team-a", "wan2.6-image") == 3
        assert gw.metric(ERRORS, upstream="up", code="timeout") == 0
    finally:
        loop_thread.stop(slow)


async def test_a_deadline_cancels_the_wait_and_names_itself() -> None:
    deadlines = Deadlines()
    watch = deadlines.watch(5, 0.05)
    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert watch.timed_out()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # withdrawn: the task goes on
    assert time.monotonic() - t0 < 1.0
    await asyncio.sleep(0)  # and nothing cancels it again
    assert len(deadlines) == 0


async def test_a_cancellation_from_elsewhere_is_not_a_timeout() -> None:
    deadlines = Deadlines()
    outcomes: list[str] = []

    async def call(seconds: float) -> None:
        watch = deadlines.watch(5, seconds)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            outcomes.append("timeout" if watch.timed_out() else "cancelled")
            raise

    # Cancelled (a drain, say) long before its deadline.
    early = asyncio.create_task(call(5))
    await asyncio.sleep(0.01)
    early.cancel()
    # Cancelled from elsewhere in the same loop turn its deadline runs out: still cancelled.
    both = asyncio.create_task(call(0.05))
    await asyncio.sleep(0)  # it starts and waits
    time.sleep(0.06)  # the loop is held past the deadline (blocking on purpose)
    both.cancel()
    for task in (early, both):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert outcomes == ["cancelled", "cancelled"]
    assert len(deadlines) == 0


async def test_ended_calls_are_never_cancelled_and_are_not_kept() -> None:
    deadlines = Deadlines()
    for _ in range(5000):
        deadlines.watch(0.02, 5).done()
    live = deadlines.watch(10, 10)
    await asyncio.sleep(0.1)  # every ended call's deadline has passed: none fired
    assert len(deadlines) == 1
    # Ended calls do not pile up until their deadline (a busy gateway: thousands a second).
    assert len(deadlines._heap) < Deadlines._COMPACT_AT
    live.done()
    deadlines.close()
    assert len(deadlines) == 0
