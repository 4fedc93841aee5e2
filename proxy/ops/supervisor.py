"""`server.workers: N`: N gateway processes sharing one port, and the supervisor that runs them.

One gateway process uses one core. With `workers: N` the command becomes a
small supervisor that starts N ordinary gateway processes (`python -m proxy
serve ... --worker-index I`), each binding the same address with
`SO_REUSEPORT`: the kernel spreads new connections across them by a hash of
the connection's addresses, with no shared accept lock and no proxying hop.

What the supervisor does, and nothing else:
- reserves the port first (a bound, non-listening `SO_REUSEPORT` socket), so
  an address in use fails at once and `port: 0` resolves to one port for all;
  `server.metrics_port` likewise (the workers share it the same way);
- creates a per-run directory for prometheus_client's multiprocess mode and
  hands it to the workers (`PROMETHEUS_MULTIPROC_DIR`): `/metrics` on any
  worker then sums every worker, and a dead worker's counters keep counting
  (see proxy.metrics); the directory is removed when the supervisor exits;
- forwards SIGHUP (config reload) and SIGTERM/SIGINT (drain) to every worker,
  waits for them to drain (`server.shutdown_grace_seconds`, plus
  `server.final_scrape_seconds` with a metrics listener, plus a margin),
  and exits 0 when all exited 0; a worker still running then is killed and
  the exit code is 1;
- restarts a worker that exits on its own (with backoff), and gives up with
  exit code 1 when workers keep dying right after start (a crash loop is
  better surfaced to the orchestrator than hidden);
- asks the kernel to SIGTERM the workers if the supervisor itself dies
  (Linux `PR_SET_PDEATHSIG`), so no orphan keeps the port.

Shared state across workers needs no supervisor: the SQLite task store is
opened by every worker (WAL mode, file locks), the usage ledger is appended
by every worker (one `write` per line, O_APPEND). Reloads happen in each
worker (each watches the file and gets the forwarded SIGHUP), so
`dashscope_proxy_config_reloads_total` counts worker-reloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from proxy.config.model import Config

log = logging.getLogger("proxy.ops.supervisor")

# A worker that dies sooner than this after starting counts towards a crash loop.
QUICK_EXIT_SECONDS = 10.0
CRASH_LOOP_LIMIT = 5
MAX_BACKOFF_SECONDS = 30.0
# Beyond the workers' own grace: time to close sessions and flush the ledger.
DRAIN_MARGIN_SECONDS = 10.0
TICK_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on host:port; raises OSError if in use.

    Only listening sockets receive connections, so this one takes none; it
    keeps the port ours between worker restarts and tells `port: 0` which port.
    """
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: SIGTERM me when the supervisor dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


class Supervisor:
    """Runs `workers` gateway processes on one port until told to stop."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        *,
        host: str,
        port: int,
        environ: Mapping[str, str],
        worker_args: Sequence[str] = (),
        python: str = sys.executable,
        restart_backoff: float = 1.0,
    ) -> None:
        self._config = config
        self._config_path = config_path
        self._host = host
        self._port = port
        self._environ = dict(environ)
        self._worker_args = list(worker_args)
        self._python = python
        # First restart delay after a quick exit; doubles per further quick exit.
        self._backoff = restart_backoff
        self._workers = [Worker(i) for i in range(config.server.workers)]
        self._stop_signal: int | None = None
        self._hups = 0
        self._exit_code = 0
        self._metrics_dir = ""

    # -- signals: handlers only record; the loop acts --------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hups += 1

    # -- workers ---------------------------------------------------------------------

    def _start(self, w: Worker) -> None:
        cmd = [
            self._python,
            "-m",
            "proxy",
            "serve",
            "--config",
            self._config_path,
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--worker-index",
            str(w.index),
            *self._worker_args,
        ]
        env = {**self._environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        parent = os.getpid()
        w.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,  # noqa: S603
            preexec_fn=lambda: _die_with_parent(parent),
        )
        w.started = time.monotonic()
        w.restart_at = None
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _reap(self, w: Worker, now: float) -> None:
        """Handle a worker that exited."""
        assert w.proc is not None
        rc = w.proc.returncode
        pid = w.proc.pid
        w.proc = None
        w.exit_codes.append(rc)
        # Its live gauges (in-flight requests) must stop counting; its
        # counters stay, so totals still add up.
        with contextlib.suppress(OSError):
            mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        if self._stop_signal is not None:
            log.info("worker %d (pid %d) exited with %d", w.index, pid, rc)
            # -SIGTERM: our SIGTERM reached it before it could install a
            # handler, i.e. before it listened: nothing was lost.
            if rc not in (0, -signal.SIGTERM):
                self._exit_code = 1
            return
        quick = now - w.started < QUICK_EXIT_SECONDS
        w.quick_exits = w.quick_exits + 1 if quick else 0
        if w.quick_exits >= CRASH_LOOP_LIMIT:
            log.error(
                "worker %d exited %d times right after starting (last exit code %d); "
                "stopping all workers",
                w.index,
                w.quick_exits,
                rc,
            )
            self._exit_code = 1
            self._stop_signal = signal.SIGTERM
            return
        delay = (
            min(self._backoff * 2.0 ** (w.quick_exits - 1), MAX_BACKOFF_SECONDS) if quick else 0.0
        )
        log.error(
            "worker %d (pid %d) exited unexpectedly with %d; restarting in %gs",
            w.index,
            pid,
            rc,
            delay,
        )
        w.restart_at = now + delay

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        try:
            reserved = reserve_port(self._host, self._port)
        except OSError as exc:
            log.error(
                "cannot listen on %s:%d: %s (change it with --port / server.port)",
                self._host,
                self._port,
                exc.strerror or exc,
            )
            return 1
        self._port = reserved.getsockname()[1]
        metrics_port = self._config.server.metrics_port
        metrics_reserved: socket.socket | None = None
        if metrics_port is not None:
            try:
                metrics_reserved = reserve_port(self._host, metrics_port)
            except OSError as exc:
                reserved.close()
                log.error(
                    "cannot listen on %s:%d: %s (change it with server.metrics_port)",
                    self._host,
                    metrics_port,
                    exc.strerror or exc,
                )
                return 1
        self._metrics_dir = tempfile.mkdtemp(prefix="dashscope-proxy-metrics-")
        previous = {
            sig: signal.signal(sig, self._on_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            log.info(
                "supervisor (pid %d): %d workers on http://%s:%d (metrics directory %s)",
                os.getpid(),
                len(self._workers),
                self._host,
                self._port,
                self._metrics_dir,
            )
            for w in self._workers:
                self._start(w)
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for w in self._workers:  # only after an unexpected error in the loop
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            reserved.close()
            if metrics_reserved is not None:
                metrics_reserved.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("supervisor: all workers stopped, exit code %d", self._exit_code)
        return self._exit_code

    def _loop(self) -> None:
        forwarded = False
        deadline = 0.0
        hups_sent = 0
        while True:
            now = time.monotonic()
            if self._hups != hups_sent and not forwarded:
                hups_sent = self._hups
                log.info("SIGHUP: asking every worker to reload its config")
                self._signal_all(signal.SIGHUP)
            if self._stop_signal is not None and not forwarded:
                forwarded = True
                server = self._config.server
                # A worker's drain is its grace, then (with a metrics listener) the
                # final-scrape window; the margin covers closing up.
                final = server.final_scrape_seconds if server.metrics_port is not None else 0.0
                deadline = now + server.shutdown_grace_seconds + final + DRAIN_MARGIN_SECONDS
                log.info(
                    "%s: draining all workers (up to %gs)",
                    signal.Signals(self._stop_signal).name,
                    deadline - now,
                )
                self._signal_all(signal.SIGTERM)
            for w in self._workers:
                if w.proc is not None and w.proc.poll() is not None:
                    self._reap(w, now)
                elif (
                    w.proc is None
                    and w.restart_at is not None
                    and now >= w.restart_at
                    and self._stop_signal is None
                ):
                    self._start(w)
            running = [w for w in self._workers if w.proc is not None]
            if forwarded and not running:
                return
            if forwarded and now > deadline:
                for w in running:
                    assert w.proc is not None
                    log.error(
                        "worker %d (pid %d) did not drain in time; killing it", w.index, w.proc.pid
                    )
                    w.proc.kill()
                    w.proc.wait()
                    self._reap(w, now)
                self._exit_code = 1
                return
            time.sleep(TICK_SECONDS)
