"""What the Redis backend's modules share: timings, key names, failures, and its scripts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Protocol, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.metrics import Metrics
from proxy.state.limiter import CONCURRENCY, IMAGES_DAY, IMAGES_MONTH, RPM
from proxy.state.local import LocalStore
from proxy.state.tasks import SqliteTaskStore

T = TypeVar("T")

SOCKET_TIMEOUT = 1.0  # a Redis call slower than this counts as Redis being down
POOL_SIZE = 128  # connections per replica; waiting for one is bounded by POOL_WAIT
POOL_WAIT = 2.0
PING_SECONDS = 1.0
LEASE_SECONDS = 30.0
REFRESH_SECONDS = 10.0
# After Redis returns, unknown task ids still answer 503 this long: another replica may not
# have written back the tasks it recorded during the outage yet (it pings every second).
RECOVERY_GRACE_SECONDS = 5.0
RETENTION_SECONDS = SqliteTaskStore.RETENTION_SECONDS
DAY_TTL = 3 * 86400
MONTH_TTL = 40 * 86400
FAILURES = (RedisError, OSError, TimeoutError)
LIMIT_CODES = {1: RPM, 2: CONCURRENCY, 3: IMAGES_DAY, 4: IMAGES_MONTH}
RECONCILE_KEY = "dsp:reconcile"  # sorted set: task id -> when the reconciler polls it next
PENDING_KEY = "dsp:pending"  # sorted set: task id -> when its still pending claim was made

# The Lua scripts, one file each beside this module (KEYS and ARGV documented there).
SCRIPT_NAMES = (
    "adopt",
    "admit",
    "cas",
    "claim",
    "due",
    "hold",
    "idem_claim",
    "idem_keep",
    "idem_release",
    "put",
    "refresh",
    "release",
    "set_status",
    "usage",
)


def claim_keys(task_id: str) -> list[str]:
    """The claim of `task_id` and the set of pending claims."""
    return [f"dsp:metered:{task_id}", PENDING_KEY]


def idempotency_key(scope: str) -> str:
    """`dsp:idem:<scope>` (hash): a kept `Idempotency-Key` answer (`scope` is a digest)."""
    return f"dsp:idem:{scope}"


def claim_value(text: str | None, *, pending: bool) -> str:
    """`dsp:metered:<id>`: `p` + the claim while pending, `d` + the claim once counted
    (`d` alone: counted, no details). Older gateways wrote `1`: counted, owner unknown."""
    return ("p" if pending else "d") + (text or "")


def claim_of(value: str | None) -> tuple[bool, str | None]:
    """(pending, the claim's text) of a `dsp:metered:<id>` value."""
    if not value or value[0] not in "pd":
        return False, None
    return value[0] == "p", value[1:] or None


def script_source(name: str) -> str:
    """The text of `<name>.lua` shipped in this package."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Backend(Protocol):
    """What the limiter and the task store use of `RedisState` (which owns them)."""

    redis: Redis
    scripts: dict[str, AsyncScript]
    spool: LocalStore  # what is kept locally while Redis is unreachable
    metrics: Metrics
    recovered_at: float
    # Redis answered again and the spool is being written back: Redis is the authority
    # for tasks already handed over, though the replica still counts as down.
    recovering: bool

    @property
    def up(self) -> bool: ...

    def mark_down(self, exc: BaseException) -> None: ...

    def fallback(self, operation: str) -> None: ...

    async def call(self, op: Callable[[], Awaitable[T]]) -> T | None: ...

    def spawn(self, coro: Awaitable[None]) -> None: ...
