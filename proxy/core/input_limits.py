"""Input limits that are not the body size: HTTP header sizes and prompt lengths.

Body size is `server.max_body_bytes` (enforced by `inbound.read_body`) and JSON
nesting is bounded by the parser (a too-deep document is a 400, never a crash).
Here:

- `MAX_LINE_SIZE`, `MAX_FIELD_SIZE`, `MAX_HEADERS` (`HTTP_PARSER_LIMITS`):
  what aiohttp's HTTP parser accepts before the app sees a request.
  `GatewayRunner` sets them, and answers what the parser refuses with a
  plain 400 that quotes nothing: aiohttp's own answer (and its error log
  line) quotes the first 100 bytes of the offending line, which can be an
  `Authorization` header.
- `check_prompts`: text prompts over `MAX_PROMPT_CHARS` are refused with a
  clear 400 before they cost an upstream call. DashScope's longest documented
  prompt limit is a few thousand characters (and it truncates, not refuses),
  so the cap only stops absurd inputs, for any model, known or not; per-model
  limits are the front ends' business (`model_table`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from proxy.errors import GatewayError

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

MAX_PROMPT_CHARS = 100_000


def prompt_too_long(length: int) -> GatewayError:
    return GatewayError(
        400,
        "InvalidParameter",
        f"The prompt is too long: {length} characters, and the gateway accepts at most "
        f"{MAX_PROMPT_CHARS} (DashScope's image models read at most a few thousand).",
        openai_code="prompt_too_long",
    )


def native_prompts(obj: Mapping[str, Any]) -> Iterator[str]:
    """Pure: every prompt-like text of a native DashScope body (prompt, negative prompt,
    message texts), found leniently; nothing else (image data URLs may be megabytes)."""
    inp = obj.get("input")
    params = obj.get("parameters")
    for holder, name in ((inp, "prompt"), (inp, "negative_prompt"), (params, "negative_prompt")):
        if isinstance(holder, dict) and isinstance(holder.get(name), str):
            yield holder[name]
    messages = inp.get("messages") if isinstance(inp, dict) else None
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    yield item["text"]


def check_prompt(text: str) -> None:
    """400 if one prompt is absurdly long."""
    if len(text) > MAX_PROMPT_CHARS:
        raise prompt_too_long(len(text))


def check_prompts(obj: Mapping[str, Any]) -> None:
    """400 if the prompts of a native body together are absurdly long."""
    total = 0
    for text in native_prompts(obj):
        total += len(text)
        if total > MAX_PROMPT_CHARS:
            raise prompt_too_long(sum(len(t) for t in native_prompts(obj)))


class _SafeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, minus the echo of malformed input."""

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
