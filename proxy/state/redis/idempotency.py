"""Kept `Idempotency-Key` answers on Redis: one atomic claim shared by every replica.

`dsp:idem:<scope>` (`{dsp}:idem:<scope>` on a Redis Cluster) is a hash (`fp`,
`token`, `lease`, and `answer` once kept), written by one Lua script per step
(`idem_claim`, `idem_keep`, `idem_release`), so two replicas claiming the same scope
at the same instant never both win.
It expires `idempotency.ttl_seconds` after the answer was kept.

There is no local fallback: while Redis is unreachable a request carrying an
`Idempotency-Key` is refused with 503 and Retry-After before anything runs,
because a claim only this replica could see would not stop another replica
from running the same request a second time.
"""

from __future__ import annotations

import time

from proxy.errors import state_unavailable
from proxy.state.idempotency import Entry, KeptAnswer
from proxy.state.redis.common import Backend


class RedisIdempotency:
    """`IdempotencyStore` on Redis."""

    def __init__(self, state: Backend) -> None:
        self._s = state

    async def claim(
        self, scope: str, fingerprint: str, token: str, lease: float, ttl: float
    ) -> Entry | None:
        script = self._s.scripts["idem_claim"]
        args: list[str | int] = [
            fingerprint,
            token,
            repr(time.time() + lease),
            int(max(ttl, lease) * 1000),
        ]
        keys = [self._s.keys.idempotency(scope)]
        found = await self._s.call(lambda: script(keys=keys, args=args))
        if found is None:
            raise state_unavailable()
        if not found:
            return None
        fp, lease_until, answer = found
        return Entry(str(fp), float(lease_until), KeptAnswer.decode(answer or None))

    async def keep(self, scope: str, token: str, answer: KeptAnswer, ttl: float) -> bool:
        script = self._s.scripts["idem_keep"]
        args: list[str | int] = [token, answer.encode(), int(ttl * 1000)]
        keys = [self._s.keys.idempotency(scope)]
        done = await self._s.call(lambda: script(keys=keys, args=args))
        if done is None:
            raise state_unavailable()  # Redis went away while the request ran
        return bool(done)

    async def release(self, scope: str, token: str) -> None:
        script = self._s.scripts["idem_release"]
        keys = [self._s.keys.idempotency(scope)]
        await self._s.call(lambda: script(keys=keys, args=[token]))

    async def close(self) -> None:
        """The client is the backend's; nothing of its own to close."""
