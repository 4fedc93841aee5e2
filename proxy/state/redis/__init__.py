"""`state.backend: redis`: task ownership, metering claims and limit counters shared by replicas.

What lives in Redis (keys under `dsp:`, one logical database per deployment; on a
Redis Cluster under `{dsp}:`, the hash tag that keeps them in one slot; every name is
made by `common.Keys`, the connection by `connect`):
- `dsp:task:<id>` (hash) and `dsp:tasks:<key>` (sorted set by creation time):
  who created which task on which upstream; kept 48 h like the SQLite store.
- `dsp:metered:<id>`: the once-per-task metering claim, `SET NX`: exactly one
  replica counts a task's images, whichever replica the poll reaches. Its value
  is `p` + the claim (`proxy.state.Claim`) until the images are counted, then
  `d` + the claim; `dsp:pending` (sorted set by claim time) lists the pending
  ones, so a claim whose owner died before counting it is finished elsewhere.
- `dsp:rpm:<key>` (admission times), `dsp:conc:<key>` (in-flight leases),
  `dsp:resv:<key>` (reservation expiries) + `dsp:resvs:<key>` (images reserved, and
  their running sum in field `#`; `dsp:resvn:<key>`: the same without a sum, as written
  before it, read while it drains) and
  `dsp:used:<key>:d:<YYYYMMDD>` / `:m:<YYYYMM>` (images used, UTC): per-key
  limits. Admission is one Lua script (check every limit, then record), so
  concurrent requests on several replicas cannot both take the last slot.
  Times inside scripts are Redis's own clock (`TIME`), not the replicas'.
  Concurrency leases and request reservations expire `LEASE_SECONDS` after
  their last refresh (every `REFRESH_SECONDS`, by the replica holding them),
  so a replica that dies frees its slots within half a minute.

When Redis is unreachable (a command fails or times out after
`SOCKET_TIMEOUT` s), the replica marks it down, serves from its fallback, and
a monitor pings every `PING_SECONDS` s; when Redis answers again the replica
reconciles, then uses it again:
- limits: per-replica in-process counters (fail open to N replicas x the
  limit), seeded with the image usage last read from Redis. Image usage
  recorded meanwhile is spooled in the local SQLite file and added to Redis
  on recovery, so no usage is lost, even across a restart of the replica.
- tasks submitted during the outage: recorded in the local SQLite file and
  handed to Redis on recovery, row by row: a row is marked handed (no claim is
  won on it locally from then on; a claim waits and is made in Redis), written
  to Redis with the claim it carries in one script, then deleted. So a task
  polled on any replica while it is handed over is still counted once. Polls
  of tasks this replica does not hold answer 503 with Retry-After (the
  DashScope SDKs and the gateway's OpenAI path retry 503 polls), never
  UNKNOWN, so no client gives up on a task that exists; so do unknown ids for
  `RECOVERY_GRACE_SECONDS` after Redis returns, while other replicas write
  back what they recorded.
- a poll that reads a task from Redis and loses Redis before claiming its
  metering counts the images locally and writes the claim on recovery; if
  another replica claimed it meanwhile (only possible in a network partition)
  the images were counted twice, which is logged -- exactly then: a claim this
  replica merely saw in Redis before the outage is kept as such, not as its own.
A clean Redis restart is not an outage: a call whose pooled connection died
is retried once on a fresh connection, and only a second failure marks Redis
down. Image usage is added at least once per spooled row; Redis itself should
persist (AOF or RDB), or a Redis restart forgets task ownership and quotas.
"""

from proxy.state.redis.backend import RedisState

__all__ = ["RedisState"]
