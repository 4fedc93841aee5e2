"""Load generators: wrk when installed, else a lean Python client in its own process.

The Python client speaks just enough HTTP/1.1 (keep-alive, Content-Length and
chunked bodies, counted but not kept) on raw asyncio protocols under uvloop, so
that on one core it outruns the gateway it measures; aiohttp's client would
cost as much per request as the proxy under test. It runs as
`python -m bench.loadgen SPEC.json` and prints one JSON result line.

Modes:
    closed  `connections` loops, each sending its next request when the last
            answered, for `duration` seconds after `warmup` (throughput, latency)
    rate    the same loops paced to `rate` requests/s in total (the soak)
    count   `connections` keep-alive loops sending `count` requests in all, then
            stopping (instruction counts per request: a fixed amount of work)
    once    `connections` connections opened in quick batches, one request each,
            all held at once (the held-requests test): how many succeed
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .upstream import install_uvloop, raise_fd_limit

HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, TRAILER = range(5)


@dataclass
class RequestSpec:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""

    def raw(self, host: str, port: int) -> bytes:
        body = self.body.encode()
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if body or self.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0  # non-2xx answers
    errors: int = 0  # connection errors, timeouts, resets
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def record(self, status: int, nbytes: int, seconds: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.ok += 1
        else:
            self.failed += 1
        self.bytes += nbytes
        self.latencies.append(seconds)


class _Client(asyncio.Protocol):
    """One keep-alive connection: send a request, count the answer's bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.remaining = 0
        self.status = 0
        self.nbytes = 0
        self.waiter: asyncio.Future[tuple[int, int]] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-response"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def request(self, raw: bytes) -> tuple[int, int]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def _done(self) -> None:
        self.state = HEAD
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, self.nbytes))

    def data_received(self, data: bytes) -> None:  # noqa: C901 - one small state machine
        buf = self.buf
        buf += data
        while buf:
            if self.state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                self.status = int(head[9:12])
                self.nbytes = 0
                if b"\r\ntransfer-encoding: chunked" in head:
                    self.state = CHUNK_SIZE
                    continue
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self._done()
                    continue
                stop = head.find(b"\r\n", at + 2)
                self.remaining = int(head[at + 17 : stop if stop > 0 else None])
                self.state = BODY
                if self.remaining == 0:
                    self._done()
            elif self.state in (BODY, CHUNK_DATA):
                n = min(len(buf), self.remaining)
                del buf[:n]
                self.remaining -= n
                self.nbytes += n
                if self.remaining:
                    return
                if self.state == BODY:
                    self._done()
                else:
                    self.nbytes -= 2  # the CRLF after the chunk
                    self.state = CHUNK_SIZE
            elif self.state == CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = TRAILER
                else:
                    self.remaining = size + 2
                    self.state = CHUNK_DATA
            else:  # TRAILER
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                empty = end == 0
                del buf[: end + 2]
                if empty:
                    self._done()


async def _connect(host: str, port: int) -> _Client:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Client, host, port)
    return proto


async def _loop(
    spec: dict[str, Any],
    raws: list[bytes],
    index: int,
    stats: Stats,
    start_at: float,
    stop_at: float,
    interval: float | None,
    left: list[int] | None = None,
) -> None:
    """One connection's loop until `stop_at`, or (`left`: the requests left to send, shared
    by the loops) until none are left."""
    host, port, timeout = spec["host"], spec["port"], spec.get("timeout", 60.0)
    client: _Client | None = None
    i = index
    next_at = time.perf_counter() + (index * interval / spec["connections"] if interval else 0)
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            break
        if left is not None:
            if left[0] <= 0:
                break
            left[0] -= 1
        if interval is not None:
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += interval
        raw = raws[i % len(raws)]
        i += 1
        t0 = time.perf_counter()
        try:
            if client is None or client.transport is None:
                client = await _connect(host, port)
            status, nbytes = await asyncio.wait_for(client.request(raw), timeout)
        except (OSError, TimeoutError, ValueError):
            if t0 >= start_at:
                stats.errors += 1
            if client is not None and client.transport is not None:
                client.transport.close()
            client = None
            continue
        if t0 >= start_at and time.perf_counter() <= stop_at:
            stats.record(status, nbytes, time.perf_counter() - t0)
        if b"\r\nconnection: close" in raw[: raw.find(b"\r\n\r\n")].lower():
            # The server closes it; don't race its FIN with the next request.
            if client.transport is not None:
                client.transport.close()
            client = None
    if client is not None and client.transport is not None:
        client.transport.close()


async def _once(spec: dict[str, Any], raws: list[bytes], stats: Stats) -> dict[str, Any]:
    """Open `connections` connections (batches of 250), one request each, all held at once."""
    host, port, timeout = spec["host"], spec["port"], spec.get("timeout", 60.0)
    n = spec["connections"]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        try:
            client = await _connect(host, port)
        except OSError:
            stats.errors += 1
            return
        t = time.perf_counter()
        try:
            status, nbytes = await asyncio.wait_for(client.request(raws[i % len(raws)]), timeout)
            stats.record(status, nbytes, time.perf_counter() - t)
        except (OSError, TimeoutError, ValueError):
            stats.errors += 1
        finally:
            if client.transport is not None:
                client.transport.close()

    tasks = []
    for start in range(0, n, 250):
        tasks += [asyncio.create_task(one(i)) for i in range(start, min(n, start + 250))]
        await asyncio.sleep(0.01)
    opened = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return {"open_seconds": round(opened, 3)}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    raws = [RequestSpec(**r).raw(spec["host"], spec["port"]) for r in spec["requests"]]
    stats = Stats()
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if spec["mode"] == "once":
        extra = await _once(spec, raws, stats)
        seconds = time.perf_counter() - t0
    elif spec["mode"] == "count":
        left = [spec["count"]]
        await asyncio.gather(
            *(
                _loop(spec, raws, i, stats, t0, float("inf"), None, left)
                for i in range(spec["connections"])
            )
        )
        seconds = time.perf_counter() - t0
    else:
        warmup = spec.get("warmup", 0.0)
        start_at = t0 + warmup
        stop_at = start_at + spec["duration"]
        interval = spec["connections"] / spec["rate"] if spec["mode"] == "rate" else None
        await asyncio.gather(
            *(
                _loop(spec, raws, i, stats, start_at, stop_at, interval)
                for i in range(spec["connections"])
            )
        )
        seconds = spec["duration"]
    return summarize(stats, seconds) | extra


def summarize(stats: Stats, seconds: float) -> dict[str, Any]:
    lat = sorted(stats.latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

    return {
        "ok": stats.ok,
        "failed": stats.failed,
        "errors": stats.errors,
        "requests": stats.ok + stats.failed,
        "seconds": round(seconds, 3),
        "rps": round((stats.ok + stats.failed) / seconds, 1) if seconds else 0.0,
        "bytes": stats.bytes,
        "mb_per_s": round(stats.bytes / seconds / 1e6, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "tool": "python",
    }


# ----------------------------------------------------------------------------- wrk

_WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d}\n', summary.requests, summary.duration,
    summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(spec: dict[str, Any], cpus: set[int] | None) -> dict[str, Any]:
    """Run wrk for a `closed`-mode spec with one request shape."""
    (req,) = spec["requests"]
    r = RequestSpec(**req)
    lua = [f'wrk.method = "{r.method}"']
    if r.body:
        lua.append(f"wrk.body = [==[{r.body}]==]")
    lua += [f'wrk.headers["{k}"] = "{v}"' for k, v in r.headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lua) + "\n" + _WRK_DONE)
        script = f.name
    url = f"http://{spec['host']}:{spec['port']}{r.path}"
    base = ["wrk", "-t1", f"-c{spec['connections']}", "--timeout", "30s", "-s", script]
    try:
        if spec.get("warmup"):
            _wrk(base + [f"-d{max(1, round(spec['warmup']))}s", url], cpus)
        out = _wrk(base + [f"-d{max(1, round(spec['duration']))}s", url], cpus)
    finally:
        Path(script).unlink(missing_ok=True)
    line = next((s for s in out.splitlines() if s.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out[-500:]}")
    w = json.loads(line[8:])
    seconds = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
    return {
        "ok": w["requests"] - w["status"],
        "failed": w["status"],
        "errors": errors,
        "requests": w["requests"],
        "seconds": round(seconds, 3),
        "rps": round(w["requests"] / seconds, 1),
        "bytes": w["bytes"],
        "mb_per_s": round(w["bytes"] / seconds / 1e6, 2),
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "tool": "wrk",
    }


def _wrk(cmd: list[str], cpus: set[int] | None) -> str:
    def pin() -> None:
        if cpus:
            import os

            os.sched_setaffinity(0, cpus)

    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, preexec_fn=pin, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    raise_fd_limit()
    install_uvloop()
    print(json.dumps(asyncio.run(run(spec))), flush=True)


if __name__ == "__main__":
    main()
