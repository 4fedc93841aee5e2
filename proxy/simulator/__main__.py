"""`dashscope-sim` / `python -m proxy.simulator`: serve the DashScope simulator.

Parses the command line into `SimSettings`, serves the app with an `AppRunner` and a `TCPSite`
(large listen backlog for benchmarks), prints the base URL, and stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from .app import create_sim_app
from .settings import SimSettings

DEFAULT_KEY = "sk-sim-upstream"
# Benchmarks open thousands of connections at once; the default backlog (128) drops SYNs.
LISTEN_BACKLOG = 4096


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, int, SimSettings]:
    defaults = SimSettings()
    parser = argparse.ArgumentParser(
        prog="dashscope-sim", description="A local stand-in for DashScope image generation."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8089, help="port to listen on (0: any)")
    parser.add_argument(
        "--key",
        action="append",
        dest="keys",
        metavar="K",
        help=f"accepted API key (repeatable; default {DEFAULT_KEY})",
    )
    parser.add_argument("--any-key", action="store_true", help="accept any bearer key")
    parser.add_argument("--pending-seconds", type=float, default=defaults.pending_seconds)
    parser.add_argument("--running-seconds", type=float, default=defaults.running_seconds)
    parser.add_argument(
        "--sync-delay", type=float, default=defaults.sync_delay_seconds, help="seconds"
    )
    parser.add_argument(
        "--sse-delay", type=float, default=defaults.sse_event_delay_seconds, help="seconds"
    )
    parser.add_argument("--image-side", type=int, default=defaults.image_side, help="pixels")
    parser.add_argument("--url-ttl", type=int, default=defaults.url_ttl_seconds, help="seconds")
    parser.add_argument("--task-ttl", type=int, default=defaults.task_ttl_seconds, help="seconds")
    parser.add_argument("--record-limit", type=int, default=defaults.record_limit)
    parser.add_argument(
        "--public-url",
        metavar="URL",
        help="base of the image URLs handed out (default: the request's Host)",
    )
    parser.add_argument(
        "--zero-delay", action="store_true", help="benchmark mode: no delays, no recording"
    )
    args = parser.parse_args(argv)
    if args.image_side < 1 or args.image_side > 4096:
        parser.error("--image-side must be between 1 and 4096")
    public_url = args.public_url.rstrip("/") if args.public_url else None
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        parser.error("--public-url must start with http:// or https://")
    keys: frozenset[str] = frozenset() if args.any_key else frozenset(args.keys or [DEFAULT_KEY])
    settings = SimSettings(
        api_keys=keys,
        pending_seconds=args.pending_seconds,
        running_seconds=args.running_seconds,
        sync_delay_seconds=args.sync_delay,
        sse_event_delay_seconds=args.sse_delay,
        image_side=args.image_side,
        url_ttl_seconds=args.url_ttl,
        task_ttl_seconds=args.task_ttl,
        record_limit=args.record_limit,
        zero_delay=args.zero_delay,
        public_base_url=public_url,
    )
    return args.host, args.port, settings


async def serve(host: str, port: int, settings: SimSettings) -> None:
    runner = web.AppRunner(create_sim_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        print(f"DashScope simulator at http://{shown}:{bound}/api/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    host, port, settings = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
