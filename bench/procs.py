"""Starting the processes under test on 127.0.0.1, pinned to cores, and reading their /proc.

Linux-only by design (the deployment target): CPU time, RSS and open file
descriptors come from /proc, summed over a process and its descendants (so a
multi-worker gateway or nginx's master + worker are measured whole).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_plan() -> tuple[set[int] | None, set[int] | None, str]:
    """(cores for the process under test, cores for load generator + upstream, description)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None, None, "no pinning (no sched_setaffinity)"
    if len(cpus) < 2:
        return None, None, "no pinning (1 core: everything shares it)"
    return (
        {cpus[0]},
        set(cpus[1:]),
        f"process under test on core {cpus[0]}, "
        f"load generator + upstream on core(s) {','.join(map(str, cpus[1:]))}",
    )


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree(pid: int) -> list[int]:
    """`pid` and every descendant."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return tree(self.pid)

    def cpu_seconds(self) -> float:
        total = 0
        for p in self.pids():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{p}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLK_TCK

    def rss_kb(self) -> int:
        total = 0
        for p in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KB
        return total

    def fds(self) -> int:
        total = 0
        for p in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{p}/fd"))
        return total

    def sockets_to(self, port: int) -> int:
        """Open TCP connections of this process tree to 127.0.0.1:`port` (the upstream's
        keep-alive pool: descriptors that are reused, not leaked)."""
        inodes = set()
        for p in self.pids():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{p}/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/{p}/fd/{fd}")
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
        remote = f":{port:04X}"
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    cols = line.split()
                    if len(cols) > 9 and cols[2].endswith(remote) and cols[9] in inodes:
                        count += 1
        return count

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _preexec(cpus: set[int] | None) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus:
        os.sched_setaffinity(0, cpus)


def start(
    name: str,
    argv: list[str],
    port: int,
    cpus: set[int] | None,
    workdir: Path,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    wait: bool = True,
    timeout: float = 20.0,
) -> Proc:
    """Start `argv` and wait until it accepts connections on 127.0.0.1:`port`."""
    log_path = workdir / f"{name}.log"
    log = log_path.open("ab")
    # `python -m proxy` / `-m bench.x` resolve from the repository root.
    popen = subprocess.Popen(
        argv,
        stdout=stdout,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        preexec_fn=lambda: _preexec(cpus),
    )
    log.close()
    proc = Proc(name, popen, port, log_path)
    if wait:
        wait_listening(proc, timeout)
    return proc


def wait_listening(proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}): {proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proc.port), 0.5):
            return
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(
        f"{proc.name} did not listen on {proc.port} within {timeout}s: {proc.log_tail()}"
    )


@contextlib.contextmanager
def running(
    name: str, argv: list[str], port: int, cpus: set[int] | None, workdir: Path, **kw: object
) -> Iterator[Proc]:
    proc = start(name, argv, port, cpus, workdir, **kw)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop()


def python() -> str:
    return sys.executable
