"""A TLS front for a plain TCP server (a real redis-server here), on 127.0.0.1.

Managed Redis speaks TLS (`rediss://`); the redis-server the tests start does not, so this
terminates TLS with a certificate from a test CA (trustme) and forwards the bytes. The
client side is the gateway's real Redis client, verifying the certificate against the CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import trustme

from tests.support import LoopThread


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_front(target_port: int, workdir: Path) -> Iterator[tuple[int, Path]]:
    """(TLS port, CA file): a TLS server on 127.0.0.1 forwarding to `target_port`."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = workdir / "redis-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    lt = LoopThread()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)

    server = lt.run(start())
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, ca_file
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        with contextlib.suppress(Exception):
            lt.run(stop())
        lt.close()
