"""The reserved images on Redis: a running sum the reservation scripts keep, read in one
field by admission, exact against a plain model through admissions, releases, task holds,
settlements and metered usage, and counting reservations that gateways without the sum wrote."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.config.model import LimitsConfig, StateConfig
from proxy.metrics import Metrics
from proxy.state.redis import RedisState
from tests.redis_support import RedisServer

LIMITS = LimitsConfig(images_per_day=10**9, images_per_month=10**9)


async def _stored_sum(state: RedisState, key: str) -> tuple[int, int]:
    """(the sum field, the sum of the token fields) of the key's reservations hash."""
    fields = await state.redis.hgetall(state.keys.limits(key)[4])
    values = {str(k): int(v) for k, v in fields.items()}  # the client decodes replies
    return values.pop("#", 0), sum(values.values())


async def _released(state: RedisState, key: str, token: str) -> None:
    """A release runs in the background, as after a request: wait until Redis shows it."""
    conc = state.keys.limits(key)[1]
    for _ in range(200):
        if await state.redis.zscore(conc, token) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{token} was not released")


async def test_the_redis_reserved_sum_follows_every_reservation(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    state = await RedisState.open(
        StateConfig("redis", str(tmp_path / "spool.db"), redis_server.url),
        Metrics(CollectorRegistry()),
    )
    rng = random.Random(20261203)
    model: dict[str, int] = {}  # token ("r<n>" or "t:task<n>") -> images reserved
    admitted = 0
    try:
        assert state.up
        for _ in range(400):
            op = rng.choice(["admit", "admit", "release", "hold", "settle", "usage"])
            images = rng.randint(1, 4)
            live = [t for t in model if t.startswith("r")]
            if op == "admit" or not live:
                token = f"r{admitted}"
                admitted += 1
                decision = await state.limiter.admit("k", LIMITS, token, images, time.time())
                assert decision.allowed
                assert decision.reserved == sum(model.values())
                model[token] = images
                continue
            token = rng.choice(live)
            task = "t:task" + token[1:]
            if op == "release":
                state.limiter.release("k", token)
                await _released(state, "k", token)
                model.pop(token)
            elif op == "hold":
                await state.limiter.hold_for_task("k", token, "task" + token[1:], time.time())
                model[task] = model.pop(token)
            elif op == "settle":
                tasks = [t for t in model if t.startswith("t:")]
                if tasks:
                    gone = rng.choice(tasks)
                    await state.limiter.settle_task("k", gone[2:])
                    model.pop(gone)
            else:
                await state.limiter.record_usage("k", images, [token, task], time.time())
                model.pop(token, None)
                model.pop(task, None)
            assert await _stored_sum(state, "k") == (sum(model.values()),) * 2
    finally:
        await state.close()


async def test_reservations_written_without_the_sum_still_count_and_drain(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A replica of the version before the sum (a rolling update) keeps reservations in the
    plain hash: admission adds them, and settling them removes them from it."""
    state = await RedisState.open(
        StateConfig("redis", str(tmp_path / "spool.db"), redis_server.url),
        Metrics(CollectorRegistry()),
    )
    try:
        _, _, resv, resvn, _ = state.keys.limits("k")
        far = int((time.time() + 3600) * 1000)
        await state.redis.hset(resvn, mapping={"t:old-task": 3, "old-request": 2})
        await state.redis.zadd(resv, {"t:old-task": far, "old-request": far})
        first = await state.limiter.admit("k", LIMITS, "new-1", 4, time.time())
        assert first.allowed and first.reserved == 5
        await state.limiter.settle_task("k", "old-task")
        second = await state.limiter.admit("k", LIMITS, "new-2", 1, time.time())
        assert second.allowed and second.reserved == 2 + 4
        assert await state.redis.hgetall(resvn) == {"old-request": "2"}
        assert await _stored_sum(state, "k") == (5, 5)
    finally:
        await state.close()


async def test_a_request_admitted_under_two_keys_keeps_and_frees_both(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A request under an image quota and a spend limit is admitted twice with one token
    (the key, and its spend key): the lease refresh extends both, and its end frees both,
    with Redis up and from the in-process fallback while Redis is down."""
    state = await RedisState.open(
        StateConfig("redis", str(tmp_path / "spool.db"), redis_server.url),
        Metrics(CollectorRegistry()),
    )
    small = LimitsConfig(images_per_day=3)
    keys = ("k", "k:spend")
    try:
        for key in keys:
            assert (await state.limiter.admit(key, small, "req-1", 2, time.time())).allowed
        conc = {key: state.keys.limits(key)[1] for key in keys}
        leased = {key: await state.redis.zscore(conc[key], "req-1") for key in keys}
        await asyncio.sleep(0.05)
        await state.limiter.refresh()
        for key in keys:
            assert await state.redis.zscore(conc[key], "req-1") > leased[key], key
        for key in keys:
            state.limiter.release(key, "req-1")
        for key in keys:
            await _released(state, key, "req-1")
            assert await _stored_sum(state, key) == (0, 0), key
            # What was reserved is free again: a second request fits the same room.
            assert (await state.limiter.admit(key, small, "req-2", 2, time.time())).allowed
            state.limiter.release(key, "req-2")
            await _released(state, key, "req-2")

        redis_server.stop()
        for token in ("req-3", "req-4"):  # served by the fallback: freed there too
            for key in keys:
                decision = await state.limiter.admit(key, small, token, 2, time.time())
                assert decision.allowed, (token, key, decision)
            assert not state.up
            for key in keys:
                state.limiter.release(key, token)
    finally:
        await state.close()


async def test_a_replicas_next_admission_sees_its_last_release(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A release goes to Redis in the background; the same replica's next admission of
    the key waits for it, so a client's next request finds the room its last one freed."""
    state = await RedisState.open(
        StateConfig("redis", str(tmp_path / "spool.db"), redis_server.url),
        Metrics(CollectorRegistry()),
    )
    small = LimitsConfig(images_per_day=2, concurrent_requests=1)
    try:
        for n in range(5):  # no pause between the release and the next admission
            token = f"req-{n}"
            decision = await state.limiter.admit("k", small, token, 2, time.time())
            assert decision.allowed, (token, decision)
            state.limiter.release("k", token)
        await _released(state, "k", "req-4")
        assert await _stored_sum(state, "k") == (0, 0)
    finally:
        await state.close()
