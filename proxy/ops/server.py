"""Serving the app: event loop choice, listening sockets, signals, graceful shutdown.

- uvloop is used when installed (the `[fast]` extra): it roughly halves the
  event loop's share of per-request CPU.
- The listen backlog comes from `server.backlog` (aiohttp's default of 128
  drops connections under a burst of thousands of clients).
- `server.metrics_port`: a second listener with only `/metrics`, `/healthz`
  and `/readyz`, which stays open through the drain (below).
- SIGTERM/SIGINT, the drain, bounded by `server.shutdown_grace_seconds` as a
  whole: `/readyz` turns 503 at once and the API listener closes (new
  connections are refused, which every load balancer retries elsewhere even
  for a POST; idle keep-alive connections are closed); in-flight requests get
  what is left of the grace to finish; those still running then are cut (each
  counted as an unmetered `drain_cut` when DashScope was still answering it).
  Then, only with a metrics listener, it waits up to
  `server.final_scrape_seconds` for one scrape that sees every count (none if
  nothing changed since the last); then the resources close (ledger fsync)
  and serve returns 0. aiohttp's own shutdown timeout is not the grace: it
  waits that long twice (for the handlers, then again after cancelling them).
  A second signal while draining changes nothing: Kubernetes follows with
  SIGKILL at `terminationGracePeriodSeconds` anyway.
- SIGHUP: reload the config file (proxy.ops.reload), which is also watched for
  changes. Without a config file (the demo) SIGHUP is logged and ignored
  rather than killing the process, SIGHUP's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from proxy.app import ACTIVITY, Activity, create_app, create_metrics_app
from proxy.config.model import Config, ServerConfig
from proxy.config.parse import Signature
from proxy.ops.reload import POLL_SECONDS, install_reloader
from proxy.ops.runner import GatewayRunner
from proxy.runtime import RUNTIME

log = logging.getLogger(__name__)

# Once the drain has waited or cut, how long closing the connections left may take.
CLOSE_SECONDS = 1.0
# How long cut handlers get to record what they lose, when the grace has run out.
CUT_SECONDS = 0.5


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
    # The drain below waits and cuts by itself; aiohttp's timeout only bounds closing
    # connections that are already idle.
    runner = GatewayRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=CLOSE_SECONDS
    )
    metrics_runner: web.AppRunner | None = None
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            host or server.host,
            server.port if port is None else port,
            backlog=server.backlog,
            reuse_port=server.workers > 1 or None,
        )
        await _start(site, "--port / server.port")
        if server.metrics_port is not None:
            metrics_runner = web.AppRunner(
                create_metrics_app(app), access_log=None, shutdown_timeout=CLOSE_SECONDS
            )
            await metrics_runner.setup()
            await _start(
                web.TCPSite(
                    metrics_runner,
                    host or server.host,
                    server.metrics_port,
                    reuse_port=server.workers > 1 or None,
                ),
                "server.metrics_port",
            )
    except OSError as exc:
        # An address in use, an unwritable state file or usage ledger: say
        # which, close what was opened, exit non-zero (no traceback).
        log.error("cannot start: %s", exc)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        return 1
    if on_ready is not None:
        on_ready(runner)
    log.info("dashscope-proxy listening on %s", ", ".join(_url(a) for a in runner.addresses))
    if metrics_runner is not None:
        log.info(
            "metrics listener (/metrics, /healthz, /readyz) on %s",
            ", ".join(_url(a) for a in metrics_runner.addresses),
        )
    await stop.wait()
    await _drain(app[ACTIVITY], runner, site, metrics_runner, server)
    log.info("shutdown complete")
    return 0


async def _start(site: web.TCPSite, option: str) -> None:
    """Start listening; an address in use names the option that changes it."""
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"{exc.strerror} (change it with {option})") from None
        raise


async def _drain(
    activity: Activity,
    runner: web.AppRunner,
    site: web.TCPSite,
    metrics_runner: web.AppRunner | None,
    server: ServerConfig,
) -> None:
    """The drain after SIGTERM, as the module docstring says; all of it within the grace,
    plus the final-scrape window when there is a metrics listener."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + server.shutdown_grace_seconds
    log.info(
        "shutting down: not ready, API listener closed, %d request(s) in flight get up to %gs%s",
        activity.in_flight,
        server.shutdown_grace_seconds,
        "; /metrics stays up on the metrics listener" if metrics_runner is not None else "",
    )
    # What aiohttp's cleanup does first, without its waiting: stop accepting, and let
    # keep-alive connections close once their current request (if any) is answered.
    await site.stop()
    await asyncio.sleep(0)  # requests accepted just before have started
    if runner.server is not None:
        runner.server.pre_shutdown()
    if await activity.idle(deadline - loop.time()):
        log.info("drain: every request finished")
    else:
        # Cancelled handlers record what they lose (unmetered drain_cut) and write
        # their access lines; they get a moment for that, then the rest is closed.
        cut = await activity.cut(CUT_SECONDS)
        log.warning(
            "drain: the %gs grace ran out; cut %d request(s) still running%s",
            server.shutdown_grace_seconds,
            cut,
            f" ({activity.in_flight} did not stop in time)" if activity.in_flight else "",
        )
    if metrics_runner is not None:
        await _final_scrape(activity, server.final_scrape_seconds)
        await metrics_runner.cleanup()
    # Closes what is left: idle connections, then the cleanup contexts (usage ledger
    # fsync, task store, ClientSession).
    await runner.cleanup()


async def _final_scrape(activity: Activity, seconds: float) -> None:
    """Keep /metrics up until a scrape has seen every count, for at most `seconds`."""
    if seconds <= 0 or not activity.unscraped():
        return
    log.info("drain: waiting up to %gs for a final scrape of /metrics", seconds)
    if await activity.scrape_after(activity.changed_at, seconds):
        log.info("drain: final scrape served")
    else:
        log.warning(
            "drain: no scrape in %gs; counts since the last one reach no scrape "
            "(the usage ledger has them, if configured)",
            seconds,
        )


def _url(address: object) -> str:
    """`http://127.0.0.1:8080` for a socket address tuple."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"http://[{host}]:{address[1]}" if ":" in host else f"http://{host}:{address[1]}"
    return str(address)
