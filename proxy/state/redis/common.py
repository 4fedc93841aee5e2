"""What the Redis backend's modules share: timings, key names, failures, and its scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from proxy.metrics import Metrics
from proxy.state.limiter import CONCURRENCY, IMAGES_DAY, IMAGES_MONTH, RPM
from proxy.state.local import LocalStore
from proxy.state.tasks import SqliteTaskStore

T = TypeVar("T")
Client = Redis | RedisCluster

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
# A cluster that cannot be reached (no node answers, a slot not covered) raises
# RedisClusterException, which is not a RedisError.
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
LIMIT_CODES = {1: RPM, 2: CONCURRENCY, 3: IMAGES_DAY, 4: IMAGES_MONTH}
PREFIX = "dsp:"  # every key name of a single server or Sentinel-managed master
# Redis Cluster: the hash tag `{dsp}` puts every key of the gateway in one hash slot, so
# each script's KEYS (and each pipeline) live on one node, as a cluster requires.
CLUSTER_PREFIX = "{dsp}:"

# The Lua scripts, one file each beside this module (KEYS and ARGV documented there).
SCRIPT_NAMES = (
    "add",
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


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key name the gateway uses, made here and only here, under `prefix`."""

    prefix: str = PREFIX

    @property
    def reconcile(self) -> str:
        """Sorted set: task id -> when the reconciler polls it next."""
        return self.prefix + "reconcile"

    @property
    def pending(self) -> str:
        """Sorted set: task id -> when its still pending claim was made."""
        return self.prefix + "pending"

    def task(self, task_id: str) -> str:
        """Hash: who created the task, where, and its last status."""
        return f"{self.prefix}task:{task_id}"

    def tasks(self, key: str) -> str:
        """Sorted set: a key's task ids by creation time."""
        return f"{self.prefix}tasks:{key}"

    def metered(self, task_id: str) -> str:
        """The task's once-per-task metering claim."""
        return f"{self.prefix}metered:{task_id}"

    def claim(self, task_id: str) -> list[str]:
        """The claim of `task_id` and the set of pending claims."""
        return [self.metered(task_id), self.pending]

    def limits(self, key: str) -> tuple[str, str, str, str, str]:
        """A key's admission times, in-flight leases, reservation expiries, reserved counts
        written before their running sum (drained), and reserved counts with their sum."""
        p = self.prefix
        return (
            f"{p}rpm:{key}",
            f"{p}conc:{key}",
            f"{p}resv:{key}",
            f"{p}resvn:{key}",
            f"{p}resvs:{key}",
        )

    def used(self, key: str, period: str) -> str:
        """Images a key used in `period` (`d:<YYYYMMDD>` or `m:<YYYYMM>`, UTC)."""
        return f"{self.prefix}used:{key}:{period}"

    def idempotency(self, scope: str) -> str:
        """Hash: a kept `Idempotency-Key` answer (`scope` is a digest)."""
        return f"{self.prefix}idem:{scope}"


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

    redis: Client
    keys: Keys
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

    def spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]: ...
