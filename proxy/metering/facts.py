"""What metering reads in DashScope's answers: image counts, task ids, delivered sizes.

An image counts when DashScope reports it: `usage.image_count` (or
`usage.output_image_count`, the qwen-image-3.0 family) of a sync JSON response,
of the final SSE event, or of the first poll that shows a task SUCCEEDED (once
per task: `TaskStore.claim_metering` decides). A successful answer that reports
neither but holds images is counted by the images it holds, as an anomaly.
Never the requested `n`, never a failed request. The delivered size
(`usage.width`/`height`, `output_width`/`output_height`, or `size`) is read too,
because a price can depend on it; never the size the client asked for.

The scanners here are pure and bounded: `BodySniffer` keeps a JSON body whole
only while it is small (the usual case: a few KB) and otherwise scans a rolling
window for the few fields metering needs, so a 6 MiB body costs a chunk of
memory, not 6 MiB. `SseSniffer` keeps only the last complete event.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from proxy.jsonutil import loads

# Bodies up to this size are parsed as JSON; larger ones are scanned.
PARSE_LIMIT = 256 * 1024
# Overlap kept between chunks so a field split across chunk boundaries is seen.
_OVERLAP = 256
_IMAGE_COUNT = re.compile(rb'"image_count"\s*:\s*(\d{1,9})')
_OUTPUT_IMAGE_COUNT = re.compile(rb'"output_image_count"\s*:\s*(\d{1,9})')
# An image held in the answer: a content item's `image` key, or a result's `url`.
_HELD_IMAGE = re.compile(rb'"(?:image|url)"\s*:\s*"')
_TASK_STATUS = re.compile(rb'"task_status"\s*:\s*"([A-Z]{1,16})"')
_TASK_ID = re.compile(rb'"task_id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')
# The delivered size, what a price tier is chosen by: `usage.width`/`height` (qwen-image),
# `output_width`/`output_height` (qwen-image-3.0), or `size` "W*H" (wan2.6).
_SIZE_FIELD = re.compile(rb'"(width|height|output_width|output_height)"\s*:\s*(\d{1,6})\b')
_SIZE_TEXT = re.compile(rb'"size"\s*:\s*"(\d{1,6}\s*[*xX]\s*\d{1,6})"')
_SIZE_STR = re.compile(r"^\s*(\d{1,6})\s*[*xX]\s*(\d{1,6})\s*$")

# Why a count was inferred (the `reason` of `dashscope_proxy_metering_anomalies_total`).
NO_COUNT_FIELD = "no_count_field"  # neither image_count nor output_image_count
INVALID_COUNT_FIELD = "invalid_count_field"  # present, but not a count


class BodyFacts(NamedTuple):
    """What metering and task routing need from a response body.

    `image_count` is DashScope's own count (`usage.image_count`, else
    `usage.output_image_count`); when a successful answer reports neither but holds
    images, it is the images held and `anomaly` says why. `width`/`height` are the
    delivered images' size as `usage` reports it (None when it does not): prices can
    depend on it, never on the size the client asked for.
    """

    image_count: int | None = None
    task_id: str | None = None
    task_status: str | None = None
    finished: bool = False
    anomaly: str | None = None
    width: int | None = None
    height: int | None = None


def _dimension(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
        return value
    return None


def size_of(usage: object) -> tuple[int | None, int | None]:
    """Pure: the delivered size `usage` reports: `width`/`height`, else
    `output_width`/`output_height`, else `size` ("W*H"); (None, None) when none."""
    if not isinstance(usage, dict):
        return None, None
    for w_name, h_name in (("width", "height"), ("output_width", "output_height")):
        w, h = _dimension(usage.get(w_name)), _dimension(usage.get(h_name))
        if w is not None and h is not None:
            return w, h
    size = usage.get("size")
    if isinstance(size, str):
        m = _SIZE_STR.match(size)
        if m:
            return _dimension(int(m.group(1))), _dimension(int(m.group(2)))
    return None, None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def images_held(output: object) -> int:
    """Pure: the images an answer's `output` holds: content items with an `image`
    (a URL or inline data), and `results[]` entries with a `url`. Text items are not
    images."""
    if not isinstance(output, dict):
        return 0
    held = 0
    choices = output.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else ():
            if isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]:
                held += 1
    results = output.get("results")
    for result in results if isinstance(results, list) else ():
        if isinstance(result, dict) and isinstance(result.get("url"), str) and result["url"]:
            held += 1
    return held


def count_of(usage: object, output: object, *, success: bool) -> tuple[int | None, str | None]:
    """Pure: the image count of one answer and, if it had to be inferred, why.

    `usage.image_count`, else `usage.output_image_count` (the qwen-image-3.0
    family), else -- for an answer that succeeded and holds images -- the images it
    holds. Never the requested `n`.
    """
    fields = usage if isinstance(usage, dict) else {}
    for name in ("image_count", "output_image_count"):
        count = _count(fields.get(name))
        if count is not None:
            return count, None
    if not success:
        return None, None
    held = images_held(output)
    if not held:
        return None, None
    present = "image_count" in fields or "output_image_count" in fields
    return held, INVALID_COUNT_FIELD if present else NO_COUNT_FIELD


def facts_from_json(obj: Any) -> BodyFacts:
    """Pure: the metering facts of a parsed DashScope body."""
    if not isinstance(obj, dict):
        return BodyFacts()
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
    # A sync answer is a success when it has output; a task only once SUCCEEDED.
    success = isinstance(output, dict) and status in (None, "SUCCEEDED")
    usage = obj.get("usage")
    count, anomaly = count_of(usage, output, success=success)
    width, height = size_of(usage)
    return BodyFacts(count, task_id, status, finished, anomaly, width, height)


def parse_facts(body: bytes) -> BodyFacts | None:
    """Pure: the facts of a JSON body; None when it is not JSON (nothing can be counted,
    though DashScope may have generated what it describes)."""
    try:
        return facts_from_json(loads(body))
    except (ValueError, RecursionError):
        return None


def facts_from_bytes(body: bytes) -> BodyFacts:
    """Pure: parse if it is JSON, else nothing to count."""
    return parse_facts(body) or BodyFacts()


class BodySniffer:
    """Accumulates a small body, scans a large one; memory bounded by PARSE_LIMIT."""

    __slots__ = (
        "_buf",
        "_count",
        "_held",
        "_sizes",
        "_output_count",
        "_overflow",
        "_status",
        "_tail",
        "_task_id",
    )

    def __init__(self) -> None:
        self._buf: bytearray | None = bytearray()
        self._tail = b""
        self._overflow = False
        self._count: int | None = None
        self._output_count: int | None = None
        self._held = 0
        # The last value seen of each `size_of` field, as a `usage` would hold it.
        self._sizes: dict[str, int | str] = {}
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
            self._search(tail + chunk[:_OVERLAP], seam=len(tail))
        if b'"' in chunk:
            self._search(chunk)
        self._tail = chunk[-_OVERLAP:] if len(chunk) >= _OVERLAP else (tail + chunk)[-_OVERLAP:]

    def _search(self, window: bytes, seam: int = 0) -> None:
        for m in _IMAGE_COUNT.finditer(window):
            self._count = int(m.group(1))
        for m in _OUTPUT_IMAGE_COUNT.finditer(window):
            self._output_count = int(m.group(1))
        for m in _HELD_IMAGE.finditer(window):
            # In a seam window only a match that straddles the seam is new: one wholly
            # in the previous tail, or wholly in the chunk, is counted by its own scan.
            if not seam or m.start() < seam < m.end():
                self._held += 1
        for m in _SIZE_FIELD.finditer(window):
            self._sizes[m.group(1).decode()] = int(m.group(2))
        for m in _SIZE_TEXT.finditer(window):
            self._sizes["size"] = m.group(1).decode()
        for m in _TASK_STATUS.finditer(window):
            self._status = m.group(1).decode()
        if self._task_id is None:
            found = _TASK_ID.search(window)
            if found:
                self._task_id = found.group(1).decode()

    @property
    def invalid(self) -> bool:
        """A body small enough to parse that is not JSON. (A scanned one cannot tell.)"""
        return self._buf is not None and parse_facts(bytes(self._buf)) is None

    def facts(self) -> BodyFacts:
        if self._buf is not None:
            return facts_from_bytes(bytes(self._buf))
        count = self._count if self._count is not None else self._output_count
        anomaly = None
        if count is None and self._held and self._status in (None, "SUCCEEDED"):
            count, anomaly = self._held, NO_COUNT_FIELD
        width, height = size_of(self._sizes)
        return BodyFacts(
            count, self._task_id, self._status, anomaly=anomaly, width=width, height=height
        )


class SseSniffer:
    """Splits an SSE byte stream into events and remembers the last one's facts.

    Only the event being assembled is buffered (capped), never the stream.
    """

    MAX_EVENT = 4 * 1024 * 1024

    __slots__ = ("_pending", "error", "invalid", "last")

    def __init__(self) -> None:
        self._pending = bytearray()
        self.last = BodyFacts()
        self.error = False
        # The last event's data was not JSON: the final answer cannot be counted.
        self.invalid = False

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
        parsed = parse_facts(b"\n".join(data))
        self.invalid = parsed is None
        self.last = parsed or BodyFacts()

    def facts(self) -> BodyFacts:
        """Facts of the final event; nothing if the stream ended on an error."""
        return BodyFacts() if self.error else self.last
