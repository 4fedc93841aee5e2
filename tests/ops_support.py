"""A real gateway *process* for the operations tests: `python -m proxy --config PATH`.

`GatewayProcess` starts it on port 0, learns the port from its "listening on"
log line, drains stdout (JSON access lines) and stderr (operational log) on
threads so the pipes never fill, and offers: HTTP helpers, parsed /metrics,
signals, and the exit code. The simulator runs in-process (the `sim` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY_A, gateway_yaml
from tests.support import Live

REPO = Path(__file__).resolve().parent.parent
MM = "/api/v1/services/aigc/multimodal-generation/generation"
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
_WORKERS = re.compile(r"workers on http://127\.0\.0\.1:(\d+)")


def body(text: str = "a cat", model: str = "qwen-image-2.0", n: int = 1) -> dict[str, Any]:
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
        "parameters": {"size": "1024*1024", "n": n},
    }


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_atomically(path: Path, text: str) -> None:
    """What editors and config management do: write aside, then rename over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class GatewayProcess:
    def __init__(self, config_path: Path, *args: str, workers: bool = False) -> None:
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config_path), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        self.stdout: list[bytes] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._drain, args=(s, k), daemon=True)
            for s, k in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for t in self._threads:
            t.start()
        pattern = _WORKERS if workers else _LISTENING
        port: list[int] = []

        def found() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"gateway exited with {self.proc.returncode}:\n" + self.stderr_text()
                )
            m = pattern.search(self.stderr_text())
            if m:
                port.append(int(m.group(1)))
            return bool(port)

        wait_for(found, 15, "the gateway to listen")
        self.port = port[0]
        self.url = f"http://127.0.0.1:{self.port}"
        if not workers:
            wait_for(lambda: self.ready() == 200, 10, "readiness")

    def _drain(self, stream: Any, kind: str) -> None:
        for line in iter(stream.readline, b""):
            with self._lock:
                if kind == "out":
                    self.stdout.append(line)
                else:
                    self.stderr.append(line.decode("utf-8", "replace"))

    # -- output ------------------------------------------------------------------

    def stderr_text(self) -> str:
        with self._lock:
            return "".join(self.stderr)

    def stdout_text(self) -> str:
        with self._lock:
            return b"".join(self.stdout).decode("utf-8", "replace")

    def access_lines(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self.stdout if line.strip()]

    # -- HTTP --------------------------------------------------------------------

    def ready(self) -> int | None:
        """/readyz status on a new connection; None if the connection is refused."""
        try:
            return requests.get(self.url + "/readyz", timeout=2).status_code
        except requests.ConnectionError:
            return None

    def generate(
        self,
        key: str = KEY_A,
        text: str = "a cat",
        model: str = "qwen-image-2.0",
        n: int = 1,
        timeout: float = 30,
    ) -> requests.Response:
        # A new connection per call (no Session): with workers, each call is
        # hashed to a worker independently.
        return requests.post(
            self.url + MM,
            json=body(text, model, n),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = requests.get(self.url + "/metrics", timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def metric_sum(self, name: str) -> float:
        return sum(v for (n, _), v in self.metrics().items() if n == name)

    # -- lifecycle ---------------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(5)


class Launcher:
    """Writes a config file and starts gateway processes on it; kills leftovers at teardown."""

    def __init__(self, sim: Live, tmp_path: Path) -> None:
        self.sim = sim
        self.tmp = tmp_path
        self.config_path = tmp_path / "gateway.yaml"
        self.running: list[GatewayProcess] = []

    def yaml(self, extra: str = "", server: str = "") -> str:
        text = gateway_yaml(self.sim.url, self.tmp / "state.db", extra)
        if server:
            text = text.replace("  port: 0\n", "  port: 0\n" + server)
        return text

    def start(
        self, extra: str = "", *args: str, server: str = "", workers: bool = False
    ) -> GatewayProcess:
        self.config_path.write_text(self.yaml(extra, server))
        gw = GatewayProcess(self.config_path, *args, workers=workers)
        self.running.append(gw)
        return gw

    def close(self) -> None:
        for gw in self.running:
            gw.close()


@contextlib.contextmanager
def launching(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    """For a test module's fixture: `with launching(sim, tmp_path) as launch: yield launch`."""
    launch = Launcher(sim, tmp_path)
    try:
        yield launch
    finally:
        launch.close()


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` on a thread; its result (or exception) lands in the returned list."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result
