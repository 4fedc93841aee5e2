"""The timeouts of a generation call while it waits on DashScope: one loop timer per app.

A generation call spends its 5-60 s waiting for DashScope's status and headers,
thousands of calls at once. aiohttp's timeouts would give each of them its own
state for that wait: for `total` a timeout handle, a timer context entered around
every read and a loop timer; for `sock_read` a loop timer of its own (about 1.4 KB
per waiting request together, docs/performance.md). `Deadlines` keeps every
watched call in one heap and arms a single loop timer for the earliest deadline.

- While a call waits for the answer, its deadline is the sooner of
  `timeouts.read` (no byte has come back yet; counted from the start of the
  call, a new connection's connect included) and `timeouts.total`. When it
  passes, the call's task is cancelled, and the caller turns exactly that
  cancellation into `TimeoutError` (`Watch.timed_out`), as `asyncio.timeout`
  does: a cancellation from elsewhere (a drain) still propagates.
- Once the answer has arrived (`Watch.answered`), `timeouts.read` is aiohttp's
  again (its `sock_read`, which follows the socket: each arriving chunk restarts
  it, and it stops while the reader is paused), and the deadline is `total`
  alone: when it passes, the body fails with `aiohttp.ServerTimeoutError` at the
  next read, what every reader of a body already handles (the error a read
  timeout raises), and the connection is closed on release.

`timeouts.connect` stays aiohttp's. Task polls and cancels (`call_upstream`) keep
all of aiohttp's timeouts: they are short calls that never wait on a generation.
"""

from __future__ import annotations

import asyncio
import heapq
import math

import aiohttp
from aiohttp import web

WAITING, READING, DONE, CANCELLED, EXPIRED = range(5)
# A timer may run a little before its time (the loop's clock resolution).
_EARLY = 0.001


class Watch:
    """One call's deadlines (`Deadlines.watch`)."""

    __slots__ = ("_deadlines", "_task", "_cancelling", "_response", "_read", "_total_at", "state")

    def __init__(
        self, deadlines: Deadlines, task: asyncio.Task[object] | None, read: float, total_at: float
    ) -> None:
        self._deadlines = deadlines
        self._task = task
        self._cancelling = task.cancelling() if task is not None else 0
        self._response: aiohttp.ClientResponse | None = None
        self._read = read
        self._total_at = total_at
        self.state = WAITING

    def answered(self, response: aiohttp.ClientResponse) -> None:
        """The status and headers arrived: `total` now bounds reading `response`, and
        `read` is aiohttp's, on the connection, from now."""
        if self.state == WAITING:
            self.state = READING
            self._response = response
            connection = response.connection
            if connection is not None:  # None: the body is already in (or there is none)
                protocol = connection.protocol
                if protocol is not None:
                    protocol.read_timeout = self._read
                    protocol.start_timeout()

    def done(self) -> None:
        """The call ended (its answer released, or it failed): the deadline no longer applies.
        (A finished watch may wait in the heap for a while: it keeps nothing of the call.)"""
        in_heap = self.state in (WAITING, READING)
        self.state = DONE
        self._task = None
        self._response = None
        if in_heap:
            self._deadlines._finished()

    def timed_out(self) -> bool:
        """For a `CancelledError` out of the wait for the answer: was it this deadline's
        (then the cancellation is withdrawn and the caller raises `TimeoutError`)? Ends
        the watch either way."""
        cancelled, task = self.state == CANCELLED, self._task
        self.done()
        return cancelled and task is not None and task.uncancel() <= self._cancelling

    def _due(self, now: float) -> float | None:
        """Its heap entry came due at `now`: act, and None; or when it is due again."""
        if self.state == WAITING:
            self.state = CANCELLED  # the task is kept for `timed_out`
            if self._task is not None:
                self._task.cancel()
        elif self.state == READING:
            if now < self._total_at:  # it was the wait's `read`: the answer came in time
                return self._total_at
            self.state = EXPIRED
            self._task = None
            response, self._response = self._response, None
            if response is not None and not response.content.is_eof():
                response.content.set_exception(
                    aiohttp.ServerTimeoutError("timeouts.total ran out reading the answer")
                )
        return None


class Deadlines:
    """The deadlines of one app's calls in flight, and the one loop timer for the earliest."""

    # Rebuild the heap once finished calls are most of it (and it is this large).
    _COMPACT_AT = 256

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._finished_in_heap = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def watch(self, read: float, total: float) -> Watch:
        """The deadlines of the call the current task is about to make: `timeouts.read`
        and `.total`, in seconds from now."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        w = Watch(self, asyncio.current_task(loop), read, now + total)
        when = now + min(read, total)
        heapq.heappush(self._heap, (when, id(w), w))
        if when < self._armed_at:
            self._arm(loop, when)
        return w

    def __len__(self) -> int:
        """Calls still watched (in flight)."""
        return len(self._heap) - self._finished_in_heap

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_at = math.inf

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._fire, loop)
        self._armed_at = when

    def _finished(self) -> None:
        self._finished_in_heap += 1
        heap = self._heap
        if len(heap) >= self._COMPACT_AT and self._finished_in_heap * 2 > len(heap):
            # Finished calls stay in the heap until their deadline; without this a busy
            # gateway would keep every call of the last `timeouts.total` seconds.
            heap[:] = [e for e in heap if e[2].state in (WAITING, READING)]
            heapq.heapify(heap)
            self._finished_in_heap = 0

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._armed_at = math.inf
        heap = self._heap
        now = loop.time() + _EARLY
        while heap and heap[0][0] <= now:
            w = heapq.heappop(heap)[2]
            if w.state == DONE:
                self._finished_in_heap -= 1
            else:
                again = w._due(now)
                if again is not None:
                    heapq.heappush(heap, (again, id(w), w))
        if heap:
            self._arm(loop, heap[0][0])


DEADLINES = web.AppKey("deadlines", Deadlines)
