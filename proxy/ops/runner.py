"""The HTTP server's input limits, and answers for what its parser refuses.

`MAX_LINE_SIZE`, `MAX_FIELD_SIZE`, `MAX_HEADERS` (`HTTP_PARSER_LIMITS`): what
aiohttp's HTTP parser accepts before the app sees a request. `GatewayRunner`
sets them, and answers what the parser refuses with a plain 400 that quotes
nothing: aiohttp's own answer (and its error log line) quotes the first 100
bytes of the offending line, which can be an `Authorization` header.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

# Request line (method, path, query): paths are short (task ids <= 128
# characters) and list-query strings small; 8 KiB is nginx's default buffer.
MAX_LINE_SIZE = 8190
# One header line: a bearer key is <= 512 characters and the SDKs' headers are
# small; 8 KiB leaves room for proxies' tracing headers.
MAX_FIELD_SIZE = 8190
# Header count: the SDKs send about 15; proxies and meshes add a few more.
MAX_HEADERS = 64

HTTP_PARSER_LIMITS: Mapping[str, int] = MappingProxyType(
    {
        "max_line_size": MAX_LINE_SIZE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
    }
)


class _SafeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, minus the echo of malformed input."""

    __slots__ = ()  # as aiohttp's own: no instance dict per connection

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self.logger.info(
            "rejected a malformed request from %s: %s (HTTP %d)",
            request.remote,
            type(exc).__name__,
            status,
        )
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        resp = web.Response(
            status=status,
            content_type="text/plain",
            text=f"{status} {phrase}: the request line or a header is malformed or too large.\n",
        )
        resp.force_close()
        return resp


class _SafeServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _SafeRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` with the gateway's header limits and a parser-error answer that
    never quotes the request (see the module docstring)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        for name, value in HTTP_PARSER_LIMITS.items():
            kwargs.setdefault(name, value)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp offers no hook for the connection handler's class; the server
        # object is otherwise untouched.
        server.__class__ = _SafeServer
        return server
