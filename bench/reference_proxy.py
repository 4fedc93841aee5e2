"""The yardstick: the smallest correct aiohttp reverse proxy, on the same stack as the gateway.

It swaps the bearer key, drops hop-by-hop headers both ways, keeps the
upstream's Content-Length, and streams bodies in 64 KiB chunks (so a 6 MiB
answer costs a chunk of memory, not 6 MiB). One ClientSession with no
connection cap, uvloop when installed. No auth, metering, metrics or logging:
whatever the gateway spends beyond this is the price of its features.

    python -m bench.reference_proxy --port N --upstream http://127.0.0.1:M --key K
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .upstream import install_uvloop, raise_fd_limit

HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
DROP_REQUEST = frozenset(HOP | {"authorization", "accept-encoding"})
DROP_RESPONSE = frozenset(HOP | {"content-encoding"})
SESSION = web.AppKey("session", aiohttp.ClientSession)
CFG = web.AppKey("cfg", argparse.Namespace)


async def handle(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CFG]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
    headers["Authorization"] = cfg.auth
    body = await request.read()
    async with request.app[SESSION].request(
        request.method,
        cfg.upstream + request.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as resp:
        out = web.StreamResponse(
            status=resp.status,
            reason=resp.reason,
            headers={k: v for k, v in resp.headers.items() if k.lower() not in DROP_RESPONSE},
        )
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        async for chunk in resp.content.iter_chunked(64 * 1024):
            await out.write(chunk)
        await out.write_eof()
        return out


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)  # the default (100) would queue held requests
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    raise_fd_limit()
    install_uvloop()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CFG] = argparse.Namespace(upstream=args.upstream.rstrip("/"), auth=f"Bearer {args.key}")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, backlog=4096, print=None)


if __name__ == "__main__":
    main()
