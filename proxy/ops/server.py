"""Serving the app: event loop choice, listening socket, signals, graceful shutdown.

- uvloop is used when installed (the `[fast]` extra): it roughly halves the
  event loop's share of per-request CPU.
- The listen backlog comes from `server.backlog` (aiohttp's default of 128
  drops connections under a burst of thousands of clients).
- SIGTERM/SIGINT: `/readyz` turns 503 at once, the listener closes (new
  connections are refused; idle keep-alive connections are closed), in-flight
  requests get `server.shutdown_grace_seconds` to finish (a request still
  running then is cancelled), the app's resources close, and serve returns 0.
  A second signal while draining changes nothing: Kubernetes follows with
  SIGKILL at `terminationGracePeriodSeconds` anyway.
- SIGHUP: reload the config file (proxy.ops.reload), which is also watched for
  changes. Without a config file (the demo) SIGHUP is logged and ignored
  rather than killing the process, SIGHUP's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from proxy.app import create_app
from proxy.config.model import Config
from proxy.config.parse import Signature
from proxy.ops.reload import POLL_SECONDS, install_reloader
from proxy.ops.runner import GatewayRunner
from proxy.runtime import RUNTIME

log = logging.getLogger(__name__)


def install_fast_loop() -> bool:
    """Use uvloop when available; returns whether it is in use."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[web.AppRunner], None] | None = None,
    app: web.Application | None = None,
    config_path: str | None = None,
    config_poll_seconds: float = POLL_SECONDS,
    config_signature: Signature | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Returns the process exit code.

    With `config_path` the config reloads on SIGHUP and when the file changes
    (`config_poll_seconds` between checks; 0 = SIGHUP only). `config_signature`
    is `config.file_signature(config_path)` from just before `config` was read.
    """
    app = app if app is not None else create_app(config)
    reloader = (
        install_reloader(
            app, config_path, poll_seconds=config_poll_seconds, loaded_signature=config_signature
        )
        if config_path
        else None
    )
    holder = app[RUNTIME]
    server = config.server
    # Signals first: a SIGTERM that arrives while the app starts is a clean,
    # immediate drain (exit 0), never Python's default of dying mid-setup.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        # Readiness fails from this instant, before the loop runs anything else.
        if holder.draining:
            log.info("%s: already draining", sig.name)
        holder.draining = True
        stop.set()

    def on_hup() -> None:
        if reloader is None:
            log.warning("SIGHUP: no config file to reload (started without --config)")
        else:
            reloader.request()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_stop, sig)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Header limits, and parser errors that never echo input (proxy.core.input_limits).
    runner = GatewayRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=server.shutdown_grace_seconds
    )
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            host or server.host,
            server.port if port is None else port,
            backlog=server.backlog,
            reuse_port=server.workers > 1 or None,
        )
        await site.start()
    except OSError as exc:
        # An address in use, an unwritable state file or usage ledger: say
        # which, close what was opened, exit non-zero (no traceback).
        log.error("cannot start: %s", exc)
        await runner.cleanup()
        return 1
    if on_ready is not None:
        on_ready(runner)
    log.info("dashscope-proxy listening on %s", ", ".join(_url(a) for a in runner.addresses))
    await stop.wait()
    log.info(
        "shutting down: not ready, listener closed, in-flight requests get up to %gs",
        server.shutdown_grace_seconds,
    )
    # Closes the listener, then waits up to shutdown_grace_seconds for
    # in-flight handlers, then runs the cleanup contexts (usage ledger fsync,
    # task store, ClientSession).
    await runner.cleanup()
    log.info("shutdown complete")
    return 0


def _url(address: object) -> str:
    """`http://127.0.0.1:8080` for a socket address tuple."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"http://[{host}]:{address[1]}" if ":" in host else f"http://{host}:{address[1]}"
    return str(address)
