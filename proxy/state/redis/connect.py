"""Connecting to Redis as operators run it: one server, a Redis Cluster, or Sentinel.

- one server (`state.url`): a blocking pool of `POOL_SIZE` connections, `BlockingConnectionPool`.
- Redis Cluster (`state.cluster: true`, `state.url` names any node): `RedisCluster`, which
  learns the nodes and slots from that one and follows `MOVED`/`ASK`. Every key name
  carries the hash tag `{dsp}` (`common.CLUSTER_PREFIX`), so the gateway's keys share one
  slot: each Lua script's KEYS and each pipeline live on one node, as a cluster demands.
- Sentinel (`state.sentinels` + `state.sentinel_master`): the sentinels name the master
  and every new connection asks them again, so after a failover the pool reconnects to
  the new master (a demoted master's connections fail, once, and are replaced).

Every client gets the same timeouts and the same single immediate retry on a fresh
connection (see `RedisState.open`). Opening connects nothing: the first command does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config.model import StateConfig
from proxy.config.state import sentinel_address
from proxy.state.redis.common import (
    CLUSTER_PREFIX,
    POOL_SIZE,
    POOL_WAIT,
    PREFIX,
    SOCKET_TIMEOUT,
    Client,
    Keys,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Connection:
    """A client, the key names to use on it, its health check, and how to close it."""

    client: Client
    keys: Keys
    mode: str  # "server", "cluster" or "sentinel"
    # One round trip to where the gateway's keys live (raises when it cannot be made).
    ping: Callable[[], Awaitable[object]]
    close: Callable[[], Awaitable[None]]


class GatedCluster(RedisCluster):
    """`RedisCluster` whose commands wait (up to `POOL_WAIT`) for one of `POOL_SIZE` slots.

    A cluster node's pool does not block: past `max_connections` a command fails at once,
    which would mark Redis down in a burst. So commands queue here instead, as on the
    single-server pool, and the node pools get room to spare for pipelines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = asyncio.Semaphore(POOL_SIZE)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(POOL_WAIT):
                await self._gate.acquire()
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._gate.release()


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels where the master is) with the blocking wait of
    the single-server pool: a burst waits up to `POOL_WAIT` for a connection instead of
    failing, and failing would mark Redis down."""


def connect(config: StateConfig) -> Connection:
    """The client `config` names (not connected yet)."""
    common: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "decode_responses": True,
    }
    if config.sentinels:
        return _sentinel(config, common)
    assert config.url is not None  # config validation requires url or sentinels
    options = {**common, **managed_redis_options(config)}
    if config.cluster:
        cluster = GatedCluster.from_url(config.url, max_connections=2 * POOL_SIZE, **options)
        keys = Keys(CLUSTER_PREFIX)

        async def ping_slot() -> object:
            # PING goes to any node; EXISTS to the node that serves the gateway's slot.
            return await cluster.exists(keys.reconcile)

        return Connection(cluster, keys, "cluster", ping_slot, cluster.aclose)
    pool = BlockingConnectionPool.from_url(
        config.url, max_connections=POOL_SIZE, timeout=POOL_WAIT, **options
    )
    client = Redis(connection_pool=pool)

    async def close() -> None:
        try:
            await client.aclose()
        finally:
            await pool.aclose()

    return Connection(client, Keys(PREFIX), "server", client.ping, close)


def _sentinel(config: StateConfig, common: dict[str, Any]) -> Connection:
    addresses = [a for a in map(sentinel_address, config.sentinels) if a is not None]
    to_sentinels: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
    }
    if config.sentinel_password:
        to_sentinels["password"] = config.sentinel_password
    sentinel = Sentinel(addresses, sentinel_kwargs=to_sentinels)  # type: ignore[no-untyped-call, unused-ignore]
    assert config.sentinel_master is not None  # config validation requires it
    client: Redis = sentinel.master_for(
        config.sentinel_master,
        redis_class=Redis,
        connection_pool_class=BlockingSentinelPool,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT,
        password=config.password,
        **common,
    )

    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelPool)

    async def ping_master() -> object:
        # Ask the sentinels every time: a master that is demoted lingers as one for a while
        # (until the sentinels reconfigure it), and pooled connections would keep writing
        # there. When the sentinels name another master, every connection is dropped (a
        # command in flight on one fails and is retried once, on the new master).
        was = pool.master_address
        now = await pool.get_master_address()  # type: ignore[no-untyped-call]
        if was is not None and now != was:
            log.warning("redis sentinel: the master moved to %s:%s", *now)
            await pool.disconnect()
        return await client.ping()

    async def close() -> None:
        try:
            await client.aclose()
        finally:
            for s in sentinel.sentinels:
                await s.aclose()

    return Connection(client, Keys(PREFIX), "sentinel", ping_master, close)


def managed_redis_options(config: StateConfig) -> dict[str, str]:
    """Pure: connection options for managed Redis: `state.password` (used when the URL
    carries none; any characters, so a Secret needs no URL-encoding) and, for a
    `rediss://` URL, `state.tls_ca_file` (the CA of a private certificate; without it the
    system's trusted CAs verify the server)."""
    options: dict[str, str] = {}
    if config.password:
        options["password"] = config.password
    if config.tls_ca_file and (config.url or "").startswith("rediss://"):
        options["ssl_ca_certs"] = config.tls_ca_file
    return options
