"""Hold thousands of concurrent requests on a slow upstream; report successes and gateway memory.

    python -m bench.load_hold [--requests 3000] [--hold 5] [--json]

Starts the DashScope simulator (`--sync-delay HOLD`: every image call takes HOLD
seconds) and the gateway (`python -m proxy`) as separate processes, then opens
REQUESTS concurrent native image requests at once and waits for all of them.
Reports how many succeeded, latency, and the gateway process's resident memory
(idle, peak while holding, after) and open file descriptors, read from /proc.
A benchmark figure, not a pass/fail test (`tests/test_load_hold.py` runs a
bounded smoke of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-load-hold-key"
PATH = "/api/v1/services/aigc/multimodal-generation/generation"
BODY = {
    "model": "qwen-image-2.0",
    "input": {"messages": [{"role": "user", "content": [{"text": "a lighthouse"}]}]},
    "parameters": {"size": "1024*1024"},
}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _status(pid: int, field: str) -> int:
    """A `VmRSS:`-style field of /proc/PID/status, in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fds(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return 0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it


async def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.05)


def _inflight(metrics_text: str) -> int:
    """The gateway's `dashscope_proxy_inflight_requests` summed over routes."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("dashscope_proxy_inflight_requests{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def _upstream_errors(gw_url: str) -> dict[str, int]:
    """`dashscope_proxy_upstream_errors_total` by code (why the gateway failed requests)."""
    out: dict[str, int] = {}
    async with aiohttp.ClientSession() as s, s.get(gw_url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("dashscope_proxy_upstream_errors_total{"):
                labels, value = line.rsplit(" ", 1)
                code = labels.split('code="', 1)[1].split('"', 1)[0]
                out[code] = out.get(code, 0) + int(float(value))
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(
    requests: int = 3000, hold: float = 5.0, workdir: Path | None = None
) -> dict[str, Any]:
    """Run the benchmark; the result figures as a dict."""
    _raise_fd_limit()
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    work = Path(tmp.name) if tmp is not None else workdir
    assert work is not None
    sim_port, gw_port = _free_port(), _free_port()
    (work / "gateway.yaml").write_text(f"""
server:
  {{host: 127.0.0.1, port: {gw_port}, access_log: false, backlog: 16384,
   usage_log: {work / "usage.jsonl"}}}
upstreams:
  - name: sim
    base_url: http://127.0.0.1:{sim_port}/api/v1
    api_key: sk-bench-upstream
keys:
  - name: bench
    key: {KEY}
state: {{path: {work / "state.db"}}}
""")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy.simulator",
                    "--port",
                    str(sim_port),
                    "--any-key",
                    "--sync-delay",
                    str(hold),
                    "--record-limit",
                    "1",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        gateway = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(work / "gateway.yaml")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(work / "gateway.log").open("wb"),
        )
        procs.append(gateway)
        await _wait_http(f"http://127.0.0.1:{sim_port}/_sim/stats")
        gw_url = f"http://127.0.0.1:{gw_port}"
        await _wait_http(gw_url + "/healthz")
        idle_rss = _status(gateway.pid, "VmRSS")
        cpu0 = {"gateway": _cpu_seconds(gateway.pid), "simulator": _cpu_seconds(procs[0].pid)}
        peak = {"rss": idle_rss, "fds": _fds(gateway.pid), "inflight": 0}
        done = asyncio.Event()

        async def sample() -> None:
            async with aiohttp.ClientSession() as probe:
                while not done.is_set():
                    peak["rss"] = max(peak["rss"], _status(gateway.pid, "VmRSS"))
                    peak["fds"] = max(peak["fds"], _fds(gateway.pid))
                    with contextlib.suppress(aiohttp.ClientError, ValueError):
                        async with probe.get(gw_url + "/metrics") as r:
                            peak["inflight"] = max(peak["inflight"], _inflight(await r.text()))
                    await asyncio.sleep(0.25)

        outcomes: Counter[str] = Counter()
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=hold + 120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                t0 = time.monotonic()
                try:
                    async with session.post(
                        gw_url + PATH, json=BODY, headers={"Authorization": f"Bearer {KEY}"}
                    ) as r:
                        await r.read()
                        outcomes[str(r.status)] += 1
                        if r.status == 200:
                            latencies.append(time.monotonic() - t0)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[type(exc).__name__] += 1

            sampler = asyncio.create_task(sample())
            t0 = time.monotonic()
            await asyncio.gather(*(one() for _ in range(requests)))
            elapsed = time.monotonic() - t0
            done.set()
            await sampler
        await asyncio.sleep(0.5)
        upstream_errors = await _upstream_errors(gw_url)
        return {
            "requests": requests,
            "hold_seconds": hold,
            "succeeded": outcomes.get("200", 0),
            "peak_held_concurrently": peak["inflight"],
            "outcomes": dict(outcomes),
            "elapsed_seconds": round(elapsed, 2),
            "latency_p50_seconds": round(_percentile(latencies, 0.5), 3),
            "latency_p99_seconds": round(_percentile(latencies, 0.99), 3),
            "latency_max_seconds": round(max(latencies, default=0.0), 3),
            "gateway_rss_idle_mib": round(idle_rss / 1024, 1),
            "gateway_rss_peak_mib": round(peak["rss"] / 1024, 1),
            "gateway_rss_peak_high_water_mib": round(_status(gateway.pid, "VmHWM") / 1024, 1),
            "gateway_rss_after_mib": round(_status(gateway.pid, "VmRSS") / 1024, 1),
            "gateway_rss_per_held_request_kib": round(
                (peak["rss"] - idle_rss) / max(1, requests), 1
            ),
            "gateway_peak_fds": peak["fds"],
            "gateway_upstream_errors": upstream_errors,
            "gateway_cpu_seconds": round(_cpu_seconds(gateway.pid) - cpu0["gateway"], 2),
            "simulator_cpu_seconds": round(_cpu_seconds(procs[0].pid) - cpu0["simulator"], 2),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
            if p.poll() is None:
                p.kill()
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_hold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=3000, help="concurrent requests")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each one takes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(run(args.requests, args.hold))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['succeeded']}/{result['requests']} requests held {args.hold:g}s "
            f"succeeded in {result['elapsed_seconds']}s ({result['outcomes']}; "
            f"{result['peak_held_concurrently']} held at once at the peak); "
            f"latency p50 {result['latency_p50_seconds']}s, p99 "
            f"{result['latency_p99_seconds']}s; gateway RSS idle "
            f"{result['gateway_rss_idle_mib']} MiB, peak {result['gateway_rss_peak_mib']} MiB "
            f"({result['gateway_rss_per_held_request_kib']} KiB per held request), after "
            f"{result['gateway_rss_after_mib']} MiB; peak fds {result['gateway_peak_fds']}; "
            f"CPU s: gateway {result['gateway_cpu_seconds']}, "
            f"simulator {result['simulator_cpu_seconds']}"
        )
    return 0 if result["succeeded"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
