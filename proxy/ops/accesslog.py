"""One structured JSON line per request, on stdout.

Fields (fixed; absent values are `null`):

    ts                    RFC 3339 UTC time the request finished, milliseconds
    request_id            the gateway's id (also in error bodies it renders)
    dashscope_request_id  DashScope's `x-request-id` of the upstream answer, if any
    key                   the caller's configured key *name* (`anonymous` if unknown)
    model                 the model asked for (at most 128 characters)
    route                 the route name (a closed set, as in the metrics)
    method, status        HTTP method and the status the client got (499: the client went
                          away, or the drain cut the request: no answer was written)
    upstream              the upstream's configured name
    error_code            DashScope error code (ours or the upstream's)
    images                images metered by this request
    latency_ms            time from request received to response finished
    pid                   the process that served it (several with `server.workers`)
    prompt                only with `server.log_prompts: true`, cut to 200 characters

Never a secret: keys appear by name, upstreams by name; no header, no raw path
or query string, no body. The prompt is off by default. Formatting happens
once per request with no logging-module machinery on the hot path; the line is
one `write` so lines of several workers sharing stdout do not interleave.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import IO, Any

from proxy.jsonutil import dumps
from proxy.runtime import RequestContext

PROMPT_LOG_CHARS = 200
MODEL_LOG_CHARS = 128
log = logging.getLogger(__name__)


def rfc3339(ts: float) -> str:
    """`2026-11-22T02:50:46.123Z` for a Unix time."""
    whole = int(ts)
    return f"{_date_time(whole)}.{min(int((ts - whole) * 1000), 999):03d}Z"


@functools.lru_cache(maxsize=8)
def _date_time(whole: int) -> str:
    """The date-time part of `rfc3339`, formatted once per second rather than per line
    (lines of one second share it; a few recent seconds are kept for out-of-order ones)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


class AccessLog:
    """Writes request lines to `stream` (binary)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._pid = os.getpid()

    def write(
        self, ctx: RequestContext, method: str, status: int, seconds: float, log_prompts: bool
    ) -> None:
        line: dict[str, Any] = {
            "ts": rfc3339(time.time()),
            "request_id": ctx.request_id,
            "dashscope_request_id": ctx.upstream_request_id,
            "key": ctx.key,
            "model": ctx.model[:MODEL_LOG_CHARS] if ctx.model else None,
            "route": ctx.route,
            "method": method,
            "upstream": ctx.upstream,
            "status": status,
            "error_code": ctx.error_code,
            "images": ctx.images,
            "latency_ms": round(seconds * 1000, 2),
            "pid": self._pid,
        }
        if log_prompts and ctx.prompt:
            line["prompt"] = ctx.prompt[:PROMPT_LOG_CHARS]
        try:
            self._stream.write(dumps(line) + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or full stdout must not fail requests.
            log.debug("access log write failed", exc_info=True)
