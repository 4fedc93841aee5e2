"""Helpers for the resilience suites: multi-upstream configs, leak probes, gateway processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY
from tests.support import Live, LoopThread

MM = "/api/v1/services/aigc/multimodal-generation/generation"
IG = "/api/v1/services/aigc/image-generation/generation"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
SECRETS = (KEY_A, KEY_B, UPSTREAM_KEY)


def body(text: str = "a cat", model: str = "qwen-image-2.0", **params: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
        "parameters": {"size": "1024*1024", **params} if model.startswith("qwen") else params,
    }


def upstream_yaml(name: str, url: str, *, priority: int = 0, extra: str = "") -> str:
    """One `upstreams:` item; `extra` is more YAML lines at the item's indentation."""
    lines = [
        f"  - name: {name}",
        f"    base_url: {url}/api/v1",
        f"    api_key: {UPSTREAM_KEY}",
        f"    priority: {priority}",
    ]
    lines += [f"    {line}" for line in extra.splitlines() if line.strip()]
    return "\n".join(lines)


def config_yaml(
    upstreams: list[str], state_path: Path, *, key_a_extra: str = "", extra: str = ""
) -> str:
    key_a = "\n".join(f"    {line}" for line in key_a_extra.splitlines() if line.strip())
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {state_path.parent / "usage.jsonl"}
upstreams:
{chr(10).join(upstreams)}
keys:
  - name: team-a
    key: {KEY_A}
{key_a}
  - name: team-b
    key: {KEY_B}
state:
  path: {state_path}
{extra}
"""


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@contextmanager
def blackhole() -> Iterator[str]:
    """A URL whose TCP connects hang: a listener with a full backlog that never accepts."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        s.close()


def sim_requests(sim: Live) -> list[dict[str, Any]]:
    return list(requests.get(sim.url + "/_sim/requests", timeout=5).json()["requests"])


def sim_model_calls(sim: Live) -> int:
    return sum(1 for r in sim_requests(sim) if "/services/" in str(r.get("path", "")))


def queue_fault(sim: Live, fault: str, count: int = 1, polls: bool = False) -> None:
    r = requests.post(
        sim.url + "/_sim/faults", json={"fault": fault, "count": count, "polls": polls}, timeout=5
    )
    assert r.status_code == 200, r.text


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# ------------------------------------------------------------------------ leaks


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def loop_tasks(loop_thread: LoopThread) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return loop_thread.run(count())


def assert_no_leaks(
    loop_thread: LoopThread,
    scenario: Callable[[], None],
    repeat: int = 10,
    slack: int = 4,
    settle_seconds: float = 8.0,
) -> None:
    """Run `scenario` once to warm up, then `repeat` times: open file descriptors and
    asyncio tasks on the gateway's loop must come back to (about) the warm baseline.
    A leak of one fd or task per run would exceed `slack` for `repeat` > `slack`."""
    scenario()
    base_fds, base_tasks = open_fds(), loop_tasks(loop_thread)
    for _ in range(repeat):
        scenario()
    deadline = time.monotonic() + settle_seconds
    while True:
        fds, tasks = open_fds(), loop_tasks(loop_thread)
        if fds <= base_fds + slack and tasks <= base_tasks + slack:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leak: fds {base_fds} -> {fds}, tasks {base_tasks} -> {tasks}")
        time.sleep(0.1)


# ------------------------------------------------------------- gateway processes


class GatewayProcess:
    """`python -m proxy --config PATH` as a child process on a fixed port."""

    def __init__(self, config_text: str, workdir: Path, name: str) -> None:
        self.port = closed_port()
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, rest = series.partition("{")
            have = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and have == want:
                return float(value)
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def team_a_yaml(
    sim_url: str,
    *,
    usage_log: Path,
    state: str,
    limits: str = "",
    upstream_models: str = "",
    extra: str = "",
) -> str:
    """One upstream (the simulator) and one key (team-a): the config most tests start from.
    `state` is the body of `state:` (indented two spaces), `extra` more top-level YAML."""
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {usage_log}
upstreams:
  - name: sim
    base_url: {sim_url}/api/v1
    api_key: {UPSTREAM_KEY}
{f"    models: {upstream_models}" if upstream_models else ""}
keys:
  - name: team-a
    key: {KEY_A}
{f"    limits: {{{limits}}}" if limits else ""}
state:
{state}
{extra}
"""
