"""Test support: run aiohttp apps on real 127.0.0.1 sockets in a background event loop.

The official DashScope 1.x SDK is synchronous (`requests`), so the servers it
talks to must run on another thread. `LoopThread` owns one event loop on a
daemon thread; `LoopThread.serve(app)` starts an app on a free port and returns
a `Live` handle with its base URL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


@dataclass
class Live:
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: web.Application, port: int = 0, shutdown_timeout: float = 1.0) -> Live:
        async def start() -> Live:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
            await site.start()
            sock = site._server.sockets[0]  # type: ignore[union-attr]
            return Live(app, runner, sock.getsockname()[1])

        return self.run(start())

    def stop(self, live: Live) -> None:
        self.run(live.runner.cleanup())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
