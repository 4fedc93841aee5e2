"""Reading what clients send: bounded bodies, JSON objects, model names.

The body limit is enforced twice: from `Content-Length` before a byte is read
(413 at once, the client need not upload 1 GB to learn it is too big), and
while reading a chunked body. Parsing failures become DashScope-coded 400s
that the dialect renderer turns into either shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.errors import GatewayError, invalid_parameter, too_large
from proxy.jsonutil import loads

MAX_MODEL_LEN = 128


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or 413 BadRequest.TooLarge without reading past `limit`."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    if length is not None:
        # The common case: one read of a known length (StreamReader.readexactly
        # would raise on a short body; read() returns what arrived).
        return await request.read() if length else b""
    chunks = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        chunks += chunk
        if len(chunks) > limit:
            raise too_large(limit)
    return bytes(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A JSON object, or 400 with a message a user can act on."""
    if not body:
        raise GatewayError(
            400,
            "BadRequest.EmptyInput",
            "Required request body is missing.",
            openai_code="invalid_request",
        )
    try:
        obj = loads(body)
    except (ValueError, RecursionError):
        raise invalid_parameter("The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(obj, dict):
        raise invalid_parameter("The request body must be a JSON object.", "invalid_json")
    return obj


def require_model(obj: dict[str, Any]) -> str:
    """`model` as DashScope validates it."""
    model = obj.get("model")
    if model is None or model == "":
        raise GatewayError(
            400,
            "BadRequest.EmptyModel",
            'Required parameter "model" missing from request.',
            openai_code="missing_model",
        )
    if not isinstance(model, str) or len(model) > MAX_MODEL_LEN or not model.isprintable():
        raise invalid_parameter('Parameter "model" must be a model name string.', "invalid_model")
    return model
