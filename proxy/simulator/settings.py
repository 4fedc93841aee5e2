"""Settings of one simulator instance: a frozen dataclass, parsed once by the caller.

Nothing here reads the environment or the command line; `__main__.py` does that and tests
build `SimSettings(...)` directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimSettings:
    """How the simulated DashScope behaves.

    Times are in seconds. With `zero_delay` every schedule and pacing delay is 0 and requests are
    not recorded (benchmark mode); explicit `[sim:slow=S]` directives still apply.
    """

    api_keys: frozenset[str] = frozenset({"sk-sim-upstream"})
    """Accepted bearer keys; an empty set accepts any non-empty key."""
    pending_seconds: float = 0.2
    """How long an async task stays PENDING (the only state in which it can be cancelled)."""
    running_seconds: float = 0.5
    """How long it then stays RUNNING before SUCCEEDED or FAILED."""
    sync_delay_seconds: float = 0.0
    """Delay before a synchronous generation (E1, E3 without the async header) answers."""
    sse_event_delay_seconds: float = 0.05
    """Pause between the events of a multi-event SSE stream (wan2.6-image interleave)."""
    image_side: int = 64
    """Side in pixels of the PNG actually drawn; `usage` still reports the requested size."""
    url_ttl_seconds: int = 86400
    """Lifetime of a signed image URL (DashScope: 24 h)."""
    task_ttl_seconds: int = 86400
    """After this a task id answers UNKNOWN (DashScope: 24 h)."""
    task_limit: int = 100_000
    """At most this many tasks are remembered; the oldest are forgotten first (UNKNOWN)."""
    record_limit: int = 500
    """How many received requests `GET /_sim/requests` keeps."""
    upload_limit_bytes: int = 256 * 1024 * 1024
    """Total size of files kept from the upload host; the oldest are dropped beyond it."""
    zero_delay: bool = False
    """Benchmark mode: all schedule delays 0, no request recording."""
    public_base_url: str | None = None
    """Base of the result-image URLs (e.g. `http://localhost:8089`) instead of the request's
    own `scheme://Host`: in a container network the caller reaches the simulator under a name
    a browser on the host cannot resolve. None: the request's Host."""

    @property
    def effective_pending(self) -> float:
        return 0.0 if self.zero_delay else max(self.pending_seconds, 0.0)

    @property
    def effective_running(self) -> float:
        return 0.0 if self.zero_delay else max(self.running_seconds, 0.0)

    @property
    def effective_sync_delay(self) -> float:
        return 0.0 if self.zero_delay else max(self.sync_delay_seconds, 0.0)

    @property
    def effective_sse_delay(self) -> float:
        return 0.0 if self.zero_delay else max(self.sse_event_delay_seconds, 0.0)
