"""The `idempotency` row: what an `Idempotency-Key` costs per request, and what a replay costs.

What it shows, against the same run's reference (the same gateway process answering the
same sync generation without the header):
- CPU per request with a fresh key on every request: the content digest, the claim
  (one SQLite transaction on the state file) and keeping the answer;
- CPU per replay: a repeat answered from the kept answer (no upstream call, no metering).

How: one gateway (the local state backend, as by default), the zero-delay bench
upstream, one connection (so no two requests of a pass share a key), interleaved runs:
no key, a fresh key each, the same key (replays). CPU is the gateway process's own
(its SQLite thread included) divided by the requests answered.

    python -m bench --only idempotency
"""

from __future__ import annotations

from typing import Any

from .core import Bench, ScenarioResult, sync_request


def _pass(
    b: Bench, port: int, requests: list[dict[str, Any]], proc: Any
) -> tuple[float, dict[str, Any]]:
    c0 = proc.cpu_seconds()
    r = b.load(port, requests, connections=1)
    answered = r["ok"] + r["failed"]
    return ((proc.cpu_seconds() - c0) * 1e6 / answered if answered else 0.0), r


def idempotency(b: Bench) -> ScenarioResult:
    res = ScenarioResult("idempotency", "Idempotency-Key: CPU per request, fresh keys and replays")
    fresh = res.metric(
        "CPU per request, fresh key", "us", ratio_to="no key", higher_is_better=False
    )
    replay = res.metric("CPU per replay", "us", ratio_to="no key", higher_is_better=False)
    n = 4000 if b.s.quick else 40_000  # more than one pass sends on one connection
    with b.gateway() as gw:
        plain = [sync_request()] * 2  # two entries: the same (Python) load generator as below
        same = [sync_request(**{"Idempotency-Key": "bench-replayed"})] * 2
        b.warm(gw.port)
        b.warm(gw.port, same, connections=1)
        for run in range(b.s.runs):
            keyed = [sync_request(**{"Idempotency-Key": f"bench-{run}-{i}"}) for i in range(n)]
            for name, reqs, metric in (
                ("no key", plain, None),
                ("gateway", keyed, fresh),
                ("gateway", same, replay),
            ):
                cpu, r = _pass(b, gw.port, reqs, gw)
                if r["failed"] or r["errors"]:
                    res.notes.append(f"{name}: {r['failed']} non-2xx, {r['errors']} errors")
                if metric is None:
                    fresh.add("no key", cpu)
                    replay.add("no key", cpu)
                else:
                    metric.add(name, cpu)
                    if metric is fresh and r["requests"] >= n:
                        res.notes.append("a pass sent every fresh key: raise n")
    return res
