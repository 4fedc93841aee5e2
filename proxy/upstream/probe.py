"""Probing an upstream's DashScope key with a call that generates nothing and costs nothing.

`GET {base_url}/tasks/<an id no one has>`: DashScope answers a working key with
HTTP 200 and `task_status: UNKNOWN`, and a refused key with 401 `InvalidApiKey`
(or 403 `AccessDenied` for a whole account). Nothing is generated, billed or
created. The gateway probes every upstream at startup and after each reload (so
`/readyz` knows a wrong key before the first team hits it), and
`dashscope-proxy check-config --probe` does the same from the command line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp

from proxy.config.model import UpstreamConfig
from proxy.upstream.call import key_headers, peek_error, rejects_key
from proxy.upstream.health import UpstreamHealth

# A syntactically valid task id that no DashScope task has.
PROBE_TASK_ID = "00000000-0000-4000-8000-000000000000"
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    upstream: str
    ok: bool
    key_rejected: bool
    detail: str  # what an operator reads: "key accepted", "DashScope rejected ..."


async def probe(session: aiohttp.ClientSession, upstream: UpstreamConfig) -> ProbeResult:
    """Probe one upstream's key. Never raises for network trouble: that is a result."""
    headers = key_headers(upstream.api_key)
    url = f"{upstream.base_url}/tasks/{PROBE_TASK_ID}"
    try:
        async with session.get(url, headers=headers, timeout=PROBE_TIMEOUT) as resp:
            if resp.status in (401, 403):
                code, message = await peek_error(resp)
                if rejects_key(resp.status, code, message):
                    return ProbeResult(
                        upstream.name,
                        False,
                        True,
                        f"DashScope rejected the API key ({resp.status} {code or ''}".strip() + ")",
                    )
            if resp.status == 200:
                return ProbeResult(upstream.name, True, False, "key accepted")
            return ProbeResult(upstream.name, False, False, f"unexpected answer HTTP {resp.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The detail names the failure's kind only: aiohttp's text can hold the URL.
        return ProbeResult(upstream.name, False, False, f"unreachable ({type(exc).__name__})")


async def probe_all(
    session: aiohttp.ClientSession, upstreams: Sequence[UpstreamConfig]
) -> list[ProbeResult]:
    return list(await asyncio.gather(*(probe(session, u) for u in upstreams)))


def apply(health: UpstreamHealth, results: Iterable[ProbeResult]) -> None:
    """Record what the probes showed: a refused key takes its upstream out of `/readyz`
    and `dashscope_proxy_upstream_up`; an accepted one puts it back. An unreachable
    upstream is the circuit breaker's business, not the key's."""
    for r in results:
        if r.key_rejected:
            health.key_rejected(r.upstream)
        elif r.ok:
            health.key_accepted(r.upstream)
