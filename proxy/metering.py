"""Image counting: what DashScope says it generated, found in bodies we relay.

An image counts when DashScope reports it: `usage.image_count` of a sync JSON
response, of the final SSE event, or of the first poll that shows a task
SUCCEEDED (once per task: `TaskStore.claim_metering` decides). Never the
requested `n`, never a failed request.

The scanners here are pure and bounded: `BodySniffer` keeps a JSON body whole
only while it is small (the usual case: a few KB) and otherwise scans a rolling
window for the few fields metering needs, so a 6 MiB body costs a chunk of
memory, not 6 MiB. `SseSniffer` keeps only the last complete event.

`Meter` is the one place a count is recorded: the metric, and any listeners
(usage ledger, quotas) the app registers.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .jsonutil import loads
from .metrics import Metrics

log = logging.getLogger(__name__)

# Bodies up to this size are parsed as JSON; larger ones are scanned.
PARSE_LIMIT = 256 * 1024
# Overlap kept between chunks so a field split across chunk boundaries is seen.
_OVERLAP = 256
_IMAGE_COUNT = re.compile(rb'"image_count"\s*:\s*(\d{1,9})')
_TASK_STATUS = re.compile(rb'"task_status"\s*:\s*"([A-Z]{1,16})"')
_TASK_ID = re.compile(rb'"task_id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What metering and task routing need from a response body."""

    image_count: int | None = None
    task_id: str | None = None
    task_status: str | None = None
    finished: bool = False


def facts_from_json(obj: Any) -> BodyFacts:
    """Pure: the metering facts of a parsed DashScope body."""
    if not isinstance(obj, dict):
        return BodyFacts()
    count: int | None = None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        c = usage.get("image_count")
        if isinstance(c, int) and not isinstance(c, bool) and c >= 0:
            count = c
    task_id = status = None
    finished = False
    output = obj.get("output")
    if isinstance(output, dict):
        tid = output.get("task_id")
        if isinstance(tid, str) and tid:
            task_id = tid
        st = output.get("task_status")
        if isinstance(st, str):
            status = st
        finished = output.get("finished") is True
        choices = output.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[-1], dict):
            finished = finished or choices[-1].get("finish_reason") == "stop"
    return BodyFacts(count, task_id, status, finished)


def facts_from_bytes(body: bytes) -> BodyFacts:
    """Pure: parse if it is JSON, else nothing to count."""
    try:
        return facts_from_json(loads(body))
    except (ValueError, RecursionError):
        return BodyFacts()


class BodySniffer:
    """Accumulates a small body, scans a large one; memory bounded by PARSE_LIMIT."""

    __slots__ = ("_buf", "_count", "_overflow", "_status", "_tail", "_task_id")

    def __init__(self) -> None:
        self._buf: bytearray | None = bytearray()
        self._tail = b""
        self._overflow = False
        self._count: int | None = None
        self._status: str | None = None
        self._task_id: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self._buf is not None:
            if len(self._buf) + len(chunk) <= PARSE_LIMIT:
                self._buf += chunk
                return
            # Switch to scanning: what we held is scanned like any chunk.
            held = bytes(self._buf)
            self._buf = None
            self._overflow = True
            self._scan(held)
        self._scan(chunk)

    def _scan(self, chunk: bytes) -> None:
        # The bulk of a large body is one long JSON string (base64 image data)
        # with no '"' in it: a memchr finds that out at memory speed, so only
        # chunks with JSON structure in them pay for the regexes. Fields that
        # straddle chunks are found in the seam (previous tail + chunk head).
        tail = self._tail
        if tail:
            self._search(tail + chunk[:_OVERLAP])
        if b'"' in chunk:
            self._search(chunk)
        self._tail = chunk[-_OVERLAP:] if len(chunk) >= _OVERLAP else (tail + chunk)[-_OVERLAP:]

    def _search(self, window: bytes) -> None:
        for m in _IMAGE_COUNT.finditer(window):
            self._count = int(m.group(1))
        for m in _TASK_STATUS.finditer(window):
            self._status = m.group(1).decode()
        if self._task_id is None:
            found = _TASK_ID.search(window)
            if found:
                self._task_id = found.group(1).decode()

    def facts(self) -> BodyFacts:
        if self._buf is not None:
            return facts_from_bytes(bytes(self._buf))
        return BodyFacts(self._count, self._task_id, self._status)


class SseSniffer:
    """Splits an SSE byte stream into events and remembers the last one's facts.

    Only the event being assembled is buffered (capped), never the stream.
    """

    MAX_EVENT = 4 * 1024 * 1024

    __slots__ = ("_pending", "error", "last")

    def __init__(self) -> None:
        self._pending = bytearray()
        self.last = BodyFacts()
        self.error = False

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk.replace(b"\r\n", b"\n")
        while True:
            end = self._pending.find(b"\n\n")
            if end < 0:
                break
            event = bytes(self._pending[:end])
            del self._pending[: end + 2]
            self._event(event)
        if len(self._pending) > self.MAX_EVENT:
            # An absurd event: stop assembling it rather than grow without bound.
            self._pending.clear()

    def _event(self, raw: bytes) -> None:
        kind = b"message"
        data: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                kind = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:])
        if not data:
            return
        if kind == b"error":
            self.error = True
            self.last = BodyFacts()
            return
        self.last = facts_from_bytes(b"\n".join(data))

    def facts(self) -> BodyFacts:
        """Facts of the final event; nothing if the stream ended on an error."""
        return BodyFacts() if self.error else self.last


@dataclass(frozen=True, slots=True)
class UsageEvent:
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


UsageListener = Callable[[UsageEvent], Awaitable[None] | None]


class Meter:
    """Records image counts: the metric first (never lost), then listeners."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.listeners: list[UsageListener] = []

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
    ) -> None:
        if images <= 0:
            return
        self._metrics.image_counter(key, model_label).inc(images)
        event = UsageEvent(
            key, model, model_label, images, route, upstream, request_id, task_id, time.time()
        )
        for listener in self.listeners:
            try:
                result = listener(event)
                if result is not None:
                    await result
            except Exception:
                # A broken ledger must not fail the request; the metric is
                # already counted and the failure is loud in the log.
                log.exception("usage listener failed for request %s", request_id)
