"""The benchmark scenarios. Each returns a `ScenarioResult`; targets are the issue's.

Every measured run of every target happens in the same session, interleaved
(run 1: direct, reference, nginx, gateway; run 2: ...), so a noisy neighbour
hurts all of them alike and the per-run ratio to the reference stays honest.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from .core import (
    GATEWAY_KEY,
    RELAY_BYTES,
    Bench,
    Sampler,
    ScenarioResult,
    sync_request,
)
from .idempotency import idempotency
from .instructions import instructions
from .procs import Proc
from .reconcile import reconciler
from .redis_topology import redis_topology
from .storage import storage
from .usage_report import usage_report

Scenario = Callable[[Bench], ScenarioResult]


@contextlib.contextmanager
def _proxies(b: Bench, nginx: bool = True) -> Iterator[dict[str, Proc]]:
    """Reference, nginx (when installed) and the gateway, all pinned to the same core."""
    with contextlib.ExitStack() as stack:
        out = {"reference": stack.enter_context(b.reference())}
        if nginx:
            ng = stack.enter_context(b.nginx())
            if ng is not None:
                out["nginx"] = ng
        out["gateway"] = stack.enter_context(b.gateway())
        for proc in out.values():
            b.warm(proc.port)
        yield out


def _check_clean(res: ScenarioResult, target: str, r: dict[str, Any]) -> None:
    if r["errors"] or r["failed"]:
        res.notes.append(
            f"{target}: {r['errors']} connection errors, {r['failed']} non-2xx "
            f"answers in one run ({r.get('statuses', '')})"
        )


# ---------------------------------------------------------------------------- rps


def rps(b: Bench) -> ScenarioResult:
    res = ScenarioResult("rps", "requests/s at 64 connections, zero-delay upstream")
    m = res.metric("requests/s @64", "req/s")
    # With every feature on (access log, usage ledger, metrics, limits, spend limits).
    cpu = res.metric("CPU per request", "us", higher_is_better=False, **ratio_at_most(1.25))
    fresh = res.metric(
        "CPU per request, new connection",
        "us",
        higher_is_better=False,
        **ratio_at_most(1.1),
    )
    with _proxies(b) as targets:
        ports = {"direct": b.upstream_port} | {k: p.port for k, p in targets.items()}
        for _ in range(b.s.runs):
            for name, port in ports.items():
                proc = targets.get(name)
                c0 = proc.cpu_seconds() if proc else 0.0
                r = b.load(port, [sync_request()], connections=64)
                _check_clean(res, name, r)
                m.add(name, r["rps"])
                if proc is not None and r["requests"]:
                    cpu.add(name, (proc.cpu_seconds() - c0) * 1e6 / r["requests"])
                if proc is None:
                    continue
                # Connection: close: every request on a new connection (SDK calls behind a
                # load balancer, a burst of held requests).
                c0 = proc.cpu_seconds()
                r = b.load(port, [sync_request(Connection="close")], connections=64)
                _check_clean(res, name, r)
                if r["requests"]:
                    fresh.add(name, (proc.cpu_seconds() - c0) * 1e6 / r["requests"])
    return res


# ------------------------------------------------------------------------ latency


def latency(b: Bench) -> ScenarioResult:
    res = ScenarioResult("latency", "added latency over direct (p50/p99)")
    figures = {
        (c, q): res.metric(f"added {q} @{c}", "ms", higher_is_better=False)
        for c in (1, 64)
        for q in ("p50", "p99")
    }
    # What the gateway's features add on top of the reference's own p50, per run.
    over = res.metric(
        "p50 @1 over the reference's",
        "ms",
        ratio_to=None,
        higher_is_better=False,
        target="<= +0.15 ms",
        check=_le(0.15),
    )
    with _proxies(b) as targets:
        for _ in range(b.s.runs):
            for c in (1, 64):
                duration = max(1.0, b.s.duration * 0.6)
                direct = b.load(b.upstream_port, [sync_request()], connections=c, duration=duration)
                for name, proc in targets.items():
                    r = b.load(proc.port, [sync_request()], connections=c, duration=duration)
                    _check_clean(res, name, r)
                    for q in ("p50", "p99"):
                        figures[(c, q)].add(name, r[f"{q}_ms"] - direct[f"{q}_ms"])
                for q in ("p50", "p99"):
                    figures[(c, q)].add("direct", direct[f"{q}_ms"])
            p50 = figures[(1, "p50")].values
            if "reference" in p50 and "gateway" in p50:
                over.add("gateway", p50["gateway"][-1] - p50["reference"][-1])
    res.notes.append(
        "direct column: the upstream's own latency; other columns: added over "
        "direct in the same run (negative = within noise)"
    )
    return res


def _le(limit: float) -> Callable[[float, float | None], bool]:
    return lambda v, _r: v <= limit


def ratio_at_most(limit: float, of: str = "reference") -> dict[str, Any]:
    """A metric's `target` and `check`: the ratio to `of` (same run) at most `limit`."""
    return {
        "target": f"<= {limit:g}x {of}",
        "check": lambda _v, r: r is not None and r <= limit,
    }


def ratio_at_least(limit: float, of: str = "reference") -> dict[str, Any]:
    """A metric's `target` and `check`: the ratio to `of` (same run) at least `limit`."""
    return {
        "target": f">= {limit:g}x {of}",
        "check": lambda _v, r: r is not None and r >= limit,
    }


# --------------------------------------------------------------------------- hold


def hold(b: Bench) -> ScenarioResult:
    n, seconds = b.s.hold_count, b.s.hold_seconds
    res = ScenarioResult("hold", f"{n} concurrent requests held {seconds:g} s by the upstream")
    ok = res.metric("succeeded", "req", target=f"= {n}", check=lambda v, _r: v >= n)
    errs = res.metric(
        "connection errors", "", higher_is_better=False, target="= 0", check=lambda v, _r: v == 0
    )
    # The memory figure is only per request if every request was in flight at once (a
    # proxy slow to take in the burst would see the first ones answered first).
    at_once = res.metric(
        "held at the upstream at once", "req", target=f"= {n}", check=lambda v, _r: v >= n
    )
    peak = res.metric("peak RSS", "MB", higher_is_better=False)
    per = res.metric(
        "memory per in-flight request",
        "KB",
        higher_is_better=False,
        **ratio_at_most(1.0),
    )
    req = sync_request(**{"X-Bench-Hold": f"{seconds:g}"})
    starts: dict[str, Callable[[], contextlib.AbstractContextManager[Proc]]] = {
        "reference": b.reference,
        "gateway": b.gateway,
    }
    for _ in range(b.s.runs):
        for name, start in starts.items():
            # A fresh process per run: Python keeps freed memory for reuse, so a
            # second hold in the same process would look cheaper than the first.
            with start() as proc:
                b.warm(proc.port)
                base = proc.rss_kb()
                _peak_held(b.upstream_port)  # a new count
                with Sampler(proc) as sampler:
                    r = b.load(proc.port, [req], connections=n, mode="once", timeout=seconds + 60)
                top = max(sampler.rss + [proc.rss_kb()])
                ok.add(name, r["ok"])
                errs.add(name, r["errors"] + r["failed"])
                at_once.add(name, _peak_held(b.upstream_port))
                peak.add(name, top / 1024)
                per.add(name, (top - base) / n)
                if r["ok"] < n:
                    res.notes.append(
                        f"{name}: {r['ok']}/{n} succeeded, {r['errors']} errors, "
                        f"statuses {r['statuses']}"
                    )
                if not proc.alive():
                    res.notes.append(f"{name} died during the hold: {proc.log_tail(500)}")
    res.notes.append(
        "memory per in-flight request = (peak RSS - RSS after warm-up) / requests; "
        "a fresh process per run; it is per request only if all were held at the upstream "
        "at once (else raise --hold-seconds)"
    )
    return res


def _peak_held(upstream_port: int) -> int:
    """The most requests the bench upstream held at once since the last call."""
    url = f"http://127.0.0.1:{upstream_port}/_bench/held"
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own upstream
        return int(json.loads(resp.read())["peak"])


# -------------------------------------------------------------------------- relay


def relay(b: Bench) -> ScenarioResult:
    res = ScenarioResult("relay", "relay of a 6 MiB JSON answer (4 connections)")
    mbps = res.metric(
        "throughput",
        "MB/s",
        **ratio_at_least(0.9),
    )
    cpu = res.metric(
        "CPU per response", "ms", higher_is_better=False, target="<= 20 ms", check=_le(20.0)
    )
    req = sync_request(**{"X-Bench-Pad": str(RELAY_BYTES - 200)})
    with _proxies(b) as targets:
        ports = {"direct": b.upstream_port} | {k: p.port for k, p in targets.items()}
        for _ in range(b.s.runs):
            for name, port in ports.items():
                proc = targets.get(name)
                c0 = proc.cpu_seconds() if proc else 0.0
                r = b.load(port, [req], connections=4)
                _check_clean(res, name, r)
                mbps.add(name, r["mb_per_s"])
                if proc is not None and r["requests"]:
                    cpu.add(name, (proc.cpu_seconds() - c0) * 1000 / r["requests"])
    return res


# ---------------------------------------------------------------------------- b64


def _post(port: int, path: str, body: dict[str, Any], key: str) -> tuple[int, bytes]:
    req = urllib.request.Request(  # noqa: S310 - 127.0.0.1 only
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def b64(b: Bench) -> ScenarioResult:
    res = ScenarioResult("b64", "OpenAI /v1/images/generations, b64_json of a 3 MiB image")
    body = {
        "model": "qwen-image-2.0",
        "prompt": "a red fox in the snow",
        "n": 1,
        "size": "1024x1024",
        "response_format": "b64_json",
    }
    req = {
        "method": "POST",
        "path": "/v1/images/generations",
        "body": json.dumps(body),
        "headers": {"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"},
    }
    with b.gateway() as gw:
        status, answer = _post(gw.port, "/v1/images/generations", body, GATEWAY_KEY)
        if status == 404:
            res.skipped = (
                "POST /v1/images/generations answers 404: the OpenAI endpoint is not there yet"
            )
            return res
        if status != 200 or b'"b64_json"' not in answer:
            res.skipped = f"POST /v1/images/generations answered {status}: {answer[:300]!r}"
            return res
        size = len(answer)
        mbps = res.metric(
            "throughput", "MB/s", target="(info) vs reference relaying a body of the same size"
        )
        cpu = res.metric(
            "CPU per response",
            "ms",
            higher_is_better=False,
            **ratio_at_most(1.5),
        )
        ref_req = sync_request(**{"X-Bench-Pad": str(size - 200)})
        with b.reference() as ref:
            b.warm(ref.port, [ref_req], connections=2)
            b.warm(gw.port, [req], connections=2)
            for _ in range(b.s.runs):
                for name, proc, r_spec in (("reference", ref, ref_req), ("gateway", gw, req)):
                    c0 = proc.cpu_seconds()
                    r = b.load(proc.port, [r_spec], connections=4)
                    _check_clean(res, name, r)
                    mbps.add(name, r["mb_per_s"])
                    if r["requests"]:
                        cpu.add(name, (proc.cpu_seconds() - c0) * 1000 / r["requests"])
        res.notes.append(
            f"gateway answer {size / 1e6:.1f} MB (fetch 3 MiB PNG from the upstream, "
            "base64, JSON); reference: relay of a same-size JSON body"
        )
    return res


# --------------------------------------------------------------------------- soak


def soak(b: Bench) -> ScenarioResult:
    seconds, rate = b.s.soak_seconds, b.s.soak_rate
    res = ScenarioResult("soak", f"soak: {seconds:g} s at {rate:g} req/s, mixed traffic")
    drift = res.metric(
        "RSS drift",
        "%",
        ratio_to=None,
        higher_is_better=False,
        target="< 10%",
        check=lambda v, _r: v < 10.0,
    )
    rss = res.metric("RSS at end", "MB", ratio_to=None, higher_is_better=False)
    fds_before = res.metric("fds before load", "", ratio_to=None)
    fds_peak = res.metric("fds peak", "", ratio_to=None)
    fds_after = res.metric("fds after load", "", ratio_to=None)
    pool_before = res.metric("upstream keep-alive sockets before", "", ratio_to=None)
    pool_after = res.metric("upstream keep-alive sockets after", "", ratio_to=None)
    # The upstream pool may keep one connection more or fewer after the soak than after
    # the warm-up (it follows the concurrency peak): descriptors *other* than those must
    # not grow.
    fds_other = res.metric(
        "fds after load, pool excluded",
        "",
        ratio_to=None,
        target="<= before, pool excluded",
        check=lambda v, _r: v <= fds_before.values["gateway"][0] - pool_before.values["gateway"][0],
    )
    mix = (
        [sync_request()] * 16
        + [
            {
                "method": "GET",
                "path": "/api/v1/tasks/0b9e1c6e-unknown-task",
                "headers": {"Authorization": f"Bearer {GATEWAY_KEY}"},
            }
        ]
        * 2
        + [sync_request("gw-not-a-configured-key-01")]
        + [{"method": "GET", "path": "/metrics", "headers": {}}]
    )
    connections = 16
    with b.gateway() as gw:
        b.warm(gw.port, mix, connections=connections)
        time.sleep(0.5)
        before, pooled_before = gw.fds(), gw.sockets_to(b.upstream_port)
        with Sampler(gw, interval=0.5 if seconds < 60 else 2.0, fds=True) as sampler:
            r = b.load(
                gw.port,
                mix,
                connections=connections,
                mode="rate",
                rate=rate,
                duration=seconds,
                warmup=0.0,
                timeout=30.0,
            )
        time.sleep(1.0)
        after, pooled_after = gw.fds(), gw.sockets_to(b.upstream_port)
        samples = sampler.rss
        k = max(1, len(samples) // 5)
        first = sorted(samples[:k])[k // 2]
        last = sorted(samples[-k:])[k // 2]
        drift.add("gateway", (last - first) * 100.0 / first)
        rss.add("gateway", last / 1024)
        fds_before.add("gateway", before)
        fds_peak.add("gateway", max(sampler.fds))
        fds_after.add("gateway", after)
        pool_before.add("gateway", pooled_before)
        pool_after.add("gateway", pooled_after)
        fds_other.add("gateway", after - pooled_after)
        if r["errors"]:
            res.notes.append(f"{r['errors']} connection errors during the soak")
        res.notes.append(
            f"{r['requests']} requests, statuses {r['statuses']}; drift = median "
            "RSS of the last fifth vs the first fifth"
        )
    return res


# ------------------------------------------------------------------------ workers


def workers(b: Bench) -> ScenarioResult:
    res = ScenarioResult("workers", "server.workers: 2 vs 1 on all cores, 128 connections")
    with b.gateway(workers=2, pinned=False) as gw2:
        b.warm(gw2.port)
        procs_2 = len(gw2.pids())
        if procs_2 < 2:
            res.skipped = (
                "server.workers: 2 started a single process: multi-worker serving "
                "is not implemented yet"
            )
            return res
        m = res.metric(
            "requests/s @128",
            "req/s",
            ratio_to="workers=1",
            **ratio_at_least(1.7, "workers=1"),
        )
        eff = res.metric("requests per gateway CPU-second", "req", ratio_to="workers=1")
        with b.gateway(workers=1, pinned=False) as gw1:
            b.warm(gw1.port)
            for _ in range(b.s.runs):
                for name, proc in (("workers=1", gw1), ("gateway", gw2)):
                    c0 = proc.cpu_seconds()
                    r = b.load(proc.port, [sync_request()], connections=128, cpus=None)
                    _check_clean(res, name, r)
                    m.add(name, r["rps"])
                    used = proc.cpu_seconds() - c0
                    if used:
                        eff.add(name, r["requests"] / used)
        _metrics_add_up(b, res, gw2)
        res.notes.append(
            f"gateway column = workers: 2 ({procs_2} processes); nothing pinned: "
            "the load generator and the upstream share the same 2 cores"
        )
    return res


def _scrape(port: int) -> dict[str, float]:
    """Sums of the request and image counters on /metrics (any worker answers for all)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    sums = {"requests": 0.0, "images": 0.0}
    for line in text.splitlines():
        if line.startswith("dashscope_proxy_requests_total{") and 'code="200"' in line:
            sums["requests"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("dashscope_proxy_images_total{"):
            sums["images"] += float(line.rsplit(" ", 1)[1])
    return sums


def _metrics_add_up(b: Bench, res: ScenarioResult, gw: Proc) -> None:
    """N requests spread over the workers must show as exactly N on one scrape."""
    n = 100 if b.s.quick else 1000
    before = _scrape(gw.port)
    r = b.load(gw.port, [sync_request()], connections=n, mode="once", timeout=60.0)
    after = _scrape(gw.port)
    got = {k: after[k] - before[k] for k in after}
    ok = r["ok"] == n and got["requests"] == n and got["images"] == n
    m = res.metric(
        "metrics add up (1 = yes)", "", ratio_to=None, target="= 1", check=lambda v, _r: v == 1
    )
    m.add("gateway", 1.0 if ok else 0.0)
    res.notes.append(
        f"metrics: {n} requests sent, {r['ok']} answered 200; one /metrics scrape "
        f"shows +{got['requests']:g} requests, +{got['images']:g} images"
    )


SCENARIOS: dict[str, Scenario] = {
    "rps": rps,
    "latency": latency,
    "hold": hold,
    "relay": relay,
    "b64": b64,
    "soak": soak,
    "workers": workers,
    "reconciler": reconciler,
    "usage": usage_report,
    "redis": redis_topology,
    "idempotency": idempotency,
    "storage": storage,
    "instructions": instructions,
}
