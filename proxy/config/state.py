"""Parsing `state:`: local SQLite, or Redis as a server, a Cluster or behind Sentinel.

    state:
      backend: redis
      url: rediss://my-redis.example.com:6379/0   # one server, or any node of a cluster
      password: ${REDIS_PASSWORD}
      cluster: true                              # Redis Cluster (cluster mode enabled)
    state:
      backend: redis
      sentinels: ["10.0.0.1:26379", "10.0.0.2:26379"]
      sentinel_master: mymaster
      password: ${REDIS_PASSWORD}                # the master's
      sentinel_password: ${SENTINEL_PASSWORD}    # the sentinels', when they need one

Exactly one of `url` and `sentinels` names Redis; a cluster needs a `redis://` or
`rediss://` URL with database 0 (a cluster has no other). Pure, like
`proxy.config.parse`; connecting is `proxy.state.redis.connect`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from proxy.config.extras import missing_extra
from proxy.config.model import StateConfig
from proxy.config.sections import Section


def parse_state(s: Section) -> StateConfig:
    d = StateConfig()
    backend = s.text("backend", d.backend)
    if backend not in ("local", "redis"):
        s.p.add(s.loc("backend"), f"must be local or redis, got {backend!r}")
    url = s.text("url")
    sentinels = _sentinels(s)
    master = s.text("sentinel_master")
    if missing := missing_extra(backend):
        s.p.add(s.loc("backend"), missing)
    if backend == "redis" and not url and not sentinels:
        s.p.add(s.loc("url"), "is required with backend: redis (or sentinels)")
    if url and sentinels:
        s.p.add(s.loc("sentinels"), "names Redis instead of url: give one of them")
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        s.p.add(s.loc("url"), "must be a redis:// , rediss:// or unix:// URL")
    if sentinels and not master:
        s.p.add(s.loc("sentinel_master"), "is required with sentinels (the master's name)")
    if master and not sentinels:
        s.p.add(s.loc("sentinel_master"), "needs sentinels")
    cluster = s.flag("cluster", d.cluster)
    if cluster and sentinels:
        s.p.add(s.loc("cluster"), "and sentinels exclude each other (a cluster fails over itself)")
    if cluster and url:
        if url.startswith("unix://"):
            s.p.add(s.loc("url"), "must be a redis:// or rediss:// URL with cluster: true")
        elif urlsplit(url).path.strip("/") not in ("", "0"):
            s.p.add(s.loc("url"), "must use database 0 with cluster: true (a cluster has no other)")
    ca = s.text("tls_ca_file")
    if ca and url and not url.startswith("rediss://"):
        s.p.add(s.loc("tls_ca_file"), "needs a rediss:// url (TLS)")
    if ca and sentinels:
        s.p.add(s.loc("tls_ca_file"), "needs a rediss:// url (TLS); not used with sentinels")
    if ca and not Path(ca).is_file():
        s.p.add(s.loc("tls_ca_file"), f"no such file: {ca}")
    return StateConfig(
        backend=backend,
        path=s.text("path", d.path),
        url=url,
        password=s.text("password"),
        tls_ca_file=ca,
        cluster=cluster,
        sentinels=sentinels,
        sentinel_master=master,
        sentinel_password=s.text("sentinel_password"),
    )


def _sentinels(s: Section) -> tuple[str, ...]:
    items = s.items("sentinels")
    for i, item in enumerate(items):
        if not isinstance(item, str) or sentinel_address(item) is None:
            s.p.add(f"{s.loc('sentinels')}[{i}]", f"must be host:port, got {item!r}"[:200])
            return ()
    return tuple(items)


def sentinel_address(text: str) -> tuple[str, int] | None:
    """Pure: `host:port` (`[::1]:26379` for IPv6) -> (host, port), or None if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)
