"""Serving the app: event loop choice, listening socket, signals, graceful shutdown.

- uvloop is used when installed (the `[fast]` extra): it roughly halves the
  event loop's share of per-request CPU.
- The listen backlog comes from `server.backlog` (aiohttp's default of 128
  drops connections under a burst of thousands of clients).
- SIGTERM/SIGINT: `/readyz` turns 503 at once, the listener closes, in-flight
  requests get `server.shutdown_grace_seconds` to finish, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .app import create_app
from .config import Config
from .runtime import RUNTIME

log = logging.getLogger(__name__)


def install_fast_loop() -> bool:
    """Use uvloop when available; returns whether it is in use."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(config: Config, *, host: str | None = None, port: int | None = None,
                on_ready: Callable[[web.AppRunner], None] | None = None,
                app: web.Application | None = None, config_path: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Returns the process exit code."""
    app = app if app is not None else create_app(config)
    server = config.server
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=server.shutdown_grace_seconds)
    await runner.setup()
    site = web.TCPSite(runner, host or server.host, server.port if port is None else port,
                       backlog=server.backlog, reuse_port=server.workers > 1 or None)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(runner)
    log.info("dashscope-proxy listening on %s", ", ".join(str(a) for a in runner.addresses))
    await stop.wait()
    log.info("shutting down: draining in-flight requests (grace %.0fs)",
             server.shutdown_grace_seconds)
    app[RUNTIME].draining = True
    await runner.cleanup()
    return 0
