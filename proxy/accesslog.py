"""One structured JSON line per request, and the optional usage ledger.

Access lines go to a stream (stdout by default) as JSON objects with fixed
fields. They never hold a secret: keys appear by their configured *name*, the
upstream by its name, and the prompt only when `server.log_prompts` is on (and
then truncated). Formatting happens once per request with no logging-module
machinery on the hot path.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Any

from .jsonutil import dumps
from .runtime import RequestContext

PROMPT_LOG_CHARS = 200
log = logging.getLogger(__name__)


class AccessLog:
    """Writes request lines to `stream` (binary)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def write(self, ctx: RequestContext, method: str, status: int, seconds: float,
              log_prompts: bool) -> None:
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "request_id": ctx.request_id,
            "dashscope_request_id": ctx.upstream_request_id,
            "key": ctx.key,
            "model": ctx.model_label,
            "route": ctx.route,
            "method": method,
            "upstream": ctx.upstream,
            "status": status,
            "error_code": ctx.error_code,
            "images": ctx.images,
            "latency_ms": round(seconds * 1000, 2),
        }
        if log_prompts and ctx.prompt:
            line["prompt"] = ctx.prompt[:PROMPT_LOG_CHARS]
        try:
            self._stream.write(dumps(line) + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or full stdout must not fail requests.
            log.debug("access log write failed", exc_info=True)
