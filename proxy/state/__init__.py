"""Where task ownership, metering claims and limit counters live: SQLite or Redis.

What every backend shares lives here: the `Claim` a process writes when it wins
a task's once-only metering claim, and `owner_id()`, the identity it writes
into it.

A claim is written *pending*, with everything counting the task needs (key,
model, upstream, images and their size, route, request id), and marked done once the images
are counted (metric and usage ledger). The two are different systems, so no
single step can do both; a process killed between them leaves a pending claim
instead of a task that is claimed (never counted again) but was never counted.
`core.reconciler` finishes such claims once their owner is gone: the owner is
provably gone when it ran on this host and its process no longer exists
(`owner_gone`), and presumed gone when the claim is older than
`tasks.pending_claim_seconds`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Claim:
    """A task's metering claim: who holds it, since when, and what counting it means.

    `ledger` is the usage log the owner writes to, so a finisher on the same host
    can see whether the owner wrote its line before it died.
    """

    key: str
    model: str
    upstream: str
    images: int
    route: str
    request_id: str
    owner: str
    at: float
    anomaly: str | None = None
    ledger: str | None = None
    width: int | None = None  # the delivered size, as the answer reported it (pricing)
    height: int | None = None

    def encode(self) -> str:
        """Canonical text (stdlib JSON, fixed field order): compare-and-set compares it
        byte for byte, so every process must encode a claim the same way."""
        fields = [getattr(self, name) for name in _FIELDS]
        return json.dumps(dict(zip(_FIELDS, fields, strict=True)), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | None) -> Claim | None:
        """The claim `encode` wrote, or None for anything else (an older or torn value)."""
        if not text:
            return None
        try:
            data: Any = json.loads(text)
            claim = cls(**{name: data[name] for name in _FIELDS})
        except (ValueError, TypeError, KeyError):
            return None
        ok = all(isinstance(v, str) for v in (claim.key, claim.model, claim.upstream))
        ok = ok and isinstance(claim.images, int) and isinstance(claim.at, int | float)
        return claim if ok and claim.encode() == text else None


_FIELDS = tuple(f.name for f in fields(Claim))


def _namespace() -> str:
    # Containers sharing a host name (host networking) have separate pid namespaces.
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        return ""


_HOST = f"{socket.gethostname()}{_namespace()}".replace("/", "_")
_OWNER: tuple[int, str] | None = None


def owner_id() -> str:
    """This process as a claim's owner: `host/pid/random`. The random part tells a
    restarted process from its predecessor when it gets the same pid (pid 1 in a
    container); it is drawn again after a fork."""
    global _OWNER
    pid = os.getpid()
    if _OWNER is None or _OWNER[0] != pid:
        _OWNER = (pid, f"{_HOST}/{pid}/{secrets.token_hex(6)}")
    return _OWNER[1]


def same_host(owner: str) -> bool:
    """True when `owner` ran on this host (and pid namespace)."""
    return owner.rsplit("/", 2)[0] == _HOST


def owner_gone(owner: str) -> bool:
    """True when `owner` provably no longer runs: a process of this host that has exited
    (or is a zombie), or whose pid this process now has. Owners elsewhere never are."""
    parts = owner.rsplit("/", 2)
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return owner != owner_id()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False
