"""The ledger in the running gateway: opened at startup, following reloads, closed at the end.

A reload can turn `server.usage_log` on, off, or move it. `LedgerFollower`, the
`Meter` listener, notices the new runtime at the next line (or within a second)
and opens the new path before closing the old one; if the new path cannot be
opened, lines keep going to the old file (nothing is lost) and the error is
logged and counted in `dashscope_proxy_usage_log_errors_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.metering import UnmeteredEvent, UsageEvent
from proxy.ops.ledger import UsageLedger
from proxy.runtime import METER, METRICS, RUNTIME, Runtime

log = logging.getLogger(__name__)

# How often the follower looks for a reload with nothing metered (turning off, moving).
FOLLOW_SECONDS = 1.0


class LedgerFollower:
    """The `Meter` listener: each line goes to the ledger of the current config.

    A reload swaps the runtime; the first line after it (or the background check,
    within a second) makes the follower reopen the same path, open a new one, or
    close the ledger, as `server.usage_log` now says.
    """

    def __init__(self, app: web.Application, ledger: UsageLedger | None) -> None:
        self._app = app
        self.ledger = ledger
        self._seen: Runtime = app[RUNTIME].current
        self._lock = asyncio.Lock()

    async def __call__(self, event: UsageEvent | UnmeteredEvent) -> None:
        if self._app[RUNTIME].current is not self._seen:
            await self.follow()
        # No await between reading the ledger and queueing the line on it: a ledger
        # being replaced is closed only after the lines queued on it are written.
        ledger = self.ledger
        if ledger is not None:
            await ledger(event)

    async def follow(self) -> None:
        """Apply the current config's `server.usage_log` if a reload changed the runtime."""
        async with self._lock:
            runtime = self._app[RUNTIME].current
            if runtime is self._seen:
                return
            self._seen = runtime
            path = runtime.config.server.usage_log
            old = self.ledger
            if old is None and not path:
                return  # still off
            if old is not None and old.path == path:
                try:
                    await old.reopen()
                except OSError as exc:
                    self._failed(path, exc)
                return
            new = None
            if path:
                new = UsageLedger(path, self._app[METRICS])
                try:
                    await new.open()
                except OSError as exc:
                    await new.close()
                    self._failed(path, exc)
                    return  # keep the old ledger (if any): nothing is lost
            self.ledger = new
            log.info("usage ledger: %s", f"appending to {path}" if path else "off")
            if old is not None:
                await old.close()

    def _failed(self, path: str | None, exc: OSError) -> None:
        self._app[METRICS].usage_log_errors.inc()
        kept = f"lines still go to {self.ledger.path}" if self.ledger else "no lines are written"
        log.error(
            "usage ledger %s: cannot open after the reload (%s); %s until a reload fixes it "
            "(the image metric still counts)",
            path,
            exc.strerror or exc,
            kept,
        )

    async def close(self) -> None:
        if self.ledger is not None:
            await self.ledger.close()
            self.ledger = None


async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: open the configured ledger, listen to the Meter, follow reloads,
    close at the end.

    Opening at startup fails loudly: an operator who asked for a ledger (or kept the
    default) must not run without one. After a reload a failure is logged and counted
    instead, because the gateway is already serving.
    """
    path = app[RUNTIME].current.config.server.usage_log
    ledger = None
    if path:
        ledger = UsageLedger(path, app[METRICS])
        try:
            await ledger.open()
        except OSError as exc:
            await ledger.close()
            raise OSError(exc.errno, f"usage ledger {path}: {exc.strerror or exc}") from None
        log.info("usage ledger: appending to %s", path)
    follower = LedgerFollower(app, ledger)
    meter = app[METER]
    meter.listeners.append(follower)
    meter.unmetered_listeners.append(follower)

    async def follow_forever() -> None:
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            try:
                await follower.follow()
            except Exception:
                log.exception("usage ledger: following a reload failed")

    task = asyncio.create_task(follow_forever(), name="usage-ledger-follow")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        meter.listeners.remove(follower)
        meter.unmetered_listeners.remove(follower)
        await follower.close()
