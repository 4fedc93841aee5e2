"""Parsing `idempotency:`: how long answers are kept, how large they may be, the lease.

    idempotency:
      ttl_seconds: 86400          # how long a kept answer is replayed
      max_answer_bytes: 16777216  # larger answers are not kept (a repeat is told so)
      lease_seconds: null         # default: the longest a request can run

An explicit `lease_seconds` must exceed every upstream's `timeouts.total`: a claim
whose lease ran out while its request still ran would tell a repeat the outcome is
unknown while it was only slow. Pure, like `proxy.config.parse`; applying it is
`proxy.core.idempotency`.
"""

from __future__ import annotations

from proxy.config.model import IdempotencyConfig, UpstreamConfig
from proxy.config.sections import Section

FIELDS = set(IdempotencyConfig.__dataclass_fields__)


def parse_idempotency(s: Section, upstreams: list[UpstreamConfig]) -> IdempotencyConfig:
    """`idempotency:`, each problem with its location."""
    d = IdempotencyConfig()
    lease = s.optional_number("lease_seconds", 1.0)
    longest = max((u.timeouts.total for u in upstreams), default=0.0)
    if lease is not None and lease <= longest:
        s.p.add(
            s.loc("lease_seconds"),
            f"must be longer than the longest upstream timeouts.total ({longest:g})",
        )
    return IdempotencyConfig(
        ttl_seconds=s.number("ttl_seconds", d.ttl_seconds, 1.0),
        max_answer_bytes=s.integer("max_answer_bytes", d.max_answer_bytes, 1024),
        lease_seconds=lease,
    )
