"""Helpers shared by the simulator tests: run a simulator in a thread, its address."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from aiohttp import web

from proxy.simulator import SimSettings, create_sim_app

KEY = "sk-sim-upstream"
OTHER_KEY = "sk-sim-other"


@dataclass(frozen=True)
class SimServer:
    root: str  # http://127.0.0.1:PORT
    key: str = KEY

    @property
    def base_url(self) -> str:
        return f"{self.root}/api/v1"

    def sim(self, method: str, path: str, **kwargs: object) -> requests.Response:
        """Call one of the simulator's own `/_sim/*` endpoints."""
        return requests.request(method, f"{self.root}{path}", timeout=10, **kwargs)  # type: ignore[arg-type]


@contextmanager
def run_simulator(settings: SimSettings) -> Iterator[SimServer]:
    """Serve `create_sim_app(settings)` on a free port in a thread until the block ends."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(create_sim_app(settings), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port.append(runner.addresses[0][1])
        except BaseException as exc:  # surfaced to the test thread below
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="dashscope-sim", daemon=True)
    thread.start()
    ready.wait(10)
    if failure or not port:
        raise RuntimeError(f"simulator did not start: {failure}")
    try:
        yield SimServer(root=f"http://127.0.0.1:{port[0]}")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
