"""`timeouts.total` of generation calls to DashScope: one loop timer per app, not per call.

aiohttp's own total timeout (`ClientTimeout(total=...)`) gives every call a timeout
handle, a timer context entered around every read of the answer, and a loop timer
of its own: about 32k instructions per request and 0.7 KB per request waiting on
DashScope (docs/performance.md). `Deadlines` keeps every watched call in one heap
and arms a single loop timer for the earliest deadline. When a call's deadline
passes:

- while it waits for DashScope's status and headers (where a request spends its
  5-60 s), its task is cancelled, and the caller turns exactly that cancellation
  into `TimeoutError` (`Watch.timed_out`), as `asyncio.timeout` does: a
  cancellation from elsewhere (the client gone, a drain) still propagates;
- once the answer is being read, its body fails with `aiohttp.ServerTimeoutError`
  at the next read, what every reader of a body already handles (the same error
  as `timeouts.read` running out), and the connection is closed on release.

`timeouts.read` and `timeouts.connect` stay aiohttp's: they measure the socket.
Task polls and cancels keep aiohttp's total timeout too (`call_upstream`): they
are short calls that never wait on a generation.
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
    """One call's deadline (`Deadlines.watch`)."""

    __slots__ = ("_deadlines", "_task", "_cancelling", "_response", "state")

    def __init__(self, deadlines: Deadlines, task: asyncio.Task[object] | None) -> None:
        self._deadlines = deadlines
        self._task = task
        self._cancelling = task.cancelling() if task is not None else 0
        self._response: aiohttp.ClientResponse | None = None
        self.state = WAITING

    def answered(self, response: aiohttp.ClientResponse) -> None:
        """The status and headers arrived: the deadline now bounds reading `response`."""
        if self.state == WAITING:
            self.state = READING
            self._response = response

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

    def _expire(self) -> None:
        if self.state == WAITING:
            self.state = CANCELLED  # the task is kept for `timed_out`
            if self._task is not None:
                self._task.cancel()
        elif self.state == READING:
            self.state = EXPIRED
            self._task = None
            response, self._response = self._response, None
            if response is not None and not response.content.is_eof():
                response.content.set_exception(
                    aiohttp.ServerTimeoutError("timeouts.total ran out reading the answer")
                )


class Deadlines:
    """The deadlines of one app's calls in flight, and the one loop timer for the earliest."""

    # Rebuild the heap once finished calls are most of it (and it is this large).
    _COMPACT_AT = 256

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._finished_in_heap = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def watch(self, seconds: float) -> Watch:
        """A deadline `seconds` from now for the call the current task is about to make."""
        loop = asyncio.get_running_loop()
        w = Watch(self, asyncio.current_task(loop))
        when = loop.time() + seconds
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
                w._expire()
        if heap:
            self._arm(loop, heap[0][0])


DEADLINES = web.AppKey("deadlines", Deadlines)
