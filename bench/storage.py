"""The `storage` row: what keeping every delivered image (`storage:`, local backend) costs.

Three figures, each against a reference measured in the same run:

- **added latency of a sync call** (one connection, p50): the gateway with storage on vs
  the same gateway with storage off; the `direct` column is one plain fetch of the same
  image from the upstream, the yardstick the answer may wait (storing is eager: the
  answer waits for one fetch and a rename, never for more);
- **memory per image in flight**: peak RSS growth over the fresh process's during a pass
  with `IN_FLIGHT` requests at once, each storing a new 4 MiB image, divided by
  `IN_FLIGHT`; reference: the storage-off gateway under the same pass. Images stream
  to disk, so this stays a small fraction of the image's size;
- **CPU per stored MB**: gateway CPU per request with storage on minus off, per MB
  stored; reference: the reference passthrough's CPU per MB relaying a body of the same
  size.

Every answer names a new image (`X-Bench-Image`), so each request really fetches and
stores one; nothing is served from an earlier copy.

    python -m bench --only storage
"""

from __future__ import annotations

import time
from typing import Any

from .core import IMAGE_BYTES, Bench, Sampler, ScenarioResult, sync_request

MEMORY_IMAGE_BYTES = 4 * 1024 * 1024
IN_FLIGHT = 64
QUICK_IN_FLIGHT = 8


def _storage_yaml(b: Bench) -> str:
    root = b.tmp / f"images-{time.monotonic_ns()}"
    return (
        "storage:\n  backend: local\n"
        f"  path: {root}\n"
        "  signing_key: bench-image-link-signing-key-0001\n"
    )


def _clean(res: ScenarioResult, name: str, r: dict[str, Any]) -> None:
    if r.get("failed") or not r.get("requests"):
        res.notes.append(f"{name}: {r.get('failed')} failed of {r.get('requests')}")


def storage(b: Bench) -> ScenarioResult:
    res = ScenarioResult("storage", "storage: on vs off, new 3 MiB image per answer (local)")
    p50 = res.metric("sync call p50 @1", "ms", higher_is_better=False)
    added = res.metric(
        "added by storing p50 @1",
        "ms",
        higher_is_better=False,
        ratio_to="direct",
        # Informational: storing is one fetch plus writing the image to disk, and the
        # direct fetch is a C client's (wrk) that reads and discards.
        target="(info) vs one fetch",
    )
    mem = res.metric(
        "memory per image in flight",
        "KB",
        higher_is_better=False,
        target=f"< 1/4 of a {MEMORY_IMAGE_BYTES // 1024} KB image",
        check=lambda v, _r: v < MEMORY_IMAGE_BYTES / 1024 / 4,
    )
    cpu = res.metric("CPU per stored MB", "ms", higher_is_better=False)
    stored_req = sync_request(**{"X-Bench-Image": str(IMAGE_BYTES)})
    plain_req = sync_request()
    fetch_req = {"method": "GET", "path": f"/img/{IMAGE_BYTES}.png", "headers": {}}
    mem_req = sync_request(**{"X-Bench-Image": str(MEMORY_IMAGE_BYTES)})
    relay_req = sync_request(**{"X-Bench-Pad": str(IMAGE_BYTES)})
    in_flight = QUICK_IN_FLIGHT if b.s.quick else IN_FLIGHT
    duration = max(1.0, b.s.duration * 0.6)
    mb = IMAGE_BYTES / 1e6
    with (
        b.gateway() as off,
        b.gateway(extra=_storage_yaml(b)) as on,
        b.reference() as ref,
    ):
        # Before any traffic: what the allocator keeps after a pass counts against us.
        idle = {"reference": off.rss_kb(), "gateway": on.rss_kb()}
        b.warm(off.port, [plain_req], connections=2)
        b.warm(on.port, [stored_req], connections=2)
        b.warm(ref.port, [relay_req], connections=2)
        for _ in range(b.s.runs):
            direct = b.load(b.upstream_port, [fetch_req], connections=1, duration=duration)
            r_off = b.load(off.port, [plain_req], connections=1, duration=duration)
            r_on = b.load(on.port, [stored_req], connections=1, duration=duration)
            _clean(res, "storage off", r_off)
            _clean(res, "storage on", r_on)
            p50.add("direct", direct["p50_ms"])
            p50.add("reference", r_off["p50_ms"])
            p50.add("gateway", r_on["p50_ms"])
            added.add("direct", direct["p50_ms"])
            added.add("gateway", r_on["p50_ms"] - r_off["p50_ms"])

            per_request: dict[str, float] = {}
            for name, proc, req in (("off", off, plain_req), ("on", on, stored_req)):
                c0 = proc.cpu_seconds()
                r = b.load(proc.port, [req], connections=4, duration=duration)
                _clean(res, f"cpu {name}", r)
                per_request[name] = (proc.cpu_seconds() - c0) * 1000 / max(r["requests"], 1)
            cpu.add("gateway", (per_request["on"] - per_request["off"]) / mb)
            c0 = ref.cpu_seconds()
            r = b.load(ref.port, [relay_req], connections=4, duration=duration)
            cpu.add("reference", (ref.cpu_seconds() - c0) * 1000 / max(r["requests"], 1) / mb)

            for name, proc, req in (("reference", off, plain_req), ("gateway", on, mem_req)):
                with Sampler(proc, interval=0.05) as sampler:
                    r = b.load(proc.port, [req], connections=in_flight, duration=duration)
                _clean(res, f"memory {name}", r)
                peak = max(sampler.rss or [idle[name]])
                mem.add(name, max(peak - idle[name], 0) / in_flight)
    res.notes.append(
        "sync call: direct = one GET of the same image from the upstream; reference = "
        "storage off; gateway = storage on (fetch, spool file, rename, link)"
    )
    res.notes.append(
        f"memory: {in_flight} requests in flight, each storing a new "
        f"{MEMORY_IMAGE_BYTES // 1024} KB image; (peak RSS - RSS before any request) "
        f"/ {in_flight}"
    )
    res.notes.append(
        "CPU per stored MB: (CPU/request on - off) / MB; reference: relaying a JSON body "
        "of the same size through the reference passthrough"
    )
    return res
