"""Reading what clients send: the shared opening, bounded bodies, JSON, models, task ids.

Every front end starts with `open_request` (context, runtime, key) and, for a
native-body generation, `read_native_request` (bounded body, JSON object,
model, allowlist, prompt limits).

The body limit is enforced twice: from `Content-Length` before a byte is read
(413 at once, the client need not upload 1 GB to learn it is too big), and
while reading a chunked body. Parsing failures become DashScope-coded 400s
that the dialect renderer turns into either shape.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from aiohttp import web

from proxy.config.model import KeyConfig
from proxy.core.input_limits import check_prompts
from proxy.errors import empty_body, invalid_parameter, missing_model, too_large
from proxy.jsonutil import loads
from proxy.runtime import CTX, RUNTIME, RequestContext, Runtime

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
        raise empty_body()
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
        raise missing_model()
    if not isinstance(model, str) or len(model) > MAX_MODEL_LEN or not model.isprintable():
        raise invalid_parameter('Parameter "model" must be a model name string.', "invalid_model")
    return model


# ------------------------------------------------------------------ the opening


class Opening(NamedTuple):
    """What every handler starts from: its context, the config it runs on, its key."""

    ctx: RequestContext
    rt: Runtime
    key: KeyConfig


def open_request(request: web.Request) -> Opening:
    """The shared opening of every front end's handler: the request's context, the
    runtime taken once (a reload mid-request does not change it), and the caller's key
    (401 otherwise)."""
    ctx = request[CTX]
    rt = request.app[RUNTIME].current
    return Opening(ctx, rt, authenticate(request, rt, ctx))


def authenticate(request: web.Request, rt: Runtime, ctx: RequestContext) -> KeyConfig:
    """The caller's configured key (401 otherwise); recorded on the context for logs
    and metrics. Every front end (native, OpenAI, aliyun) starts here."""
    key = rt.keyring.authenticate(request.headers.get("Authorization"))
    ctx.key = key.name
    return key


def set_model(ctx: RequestContext, rt: Runtime, model: str) -> None:
    """Record the model the client asked for, and its bounded metric label."""
    ctx.model = model
    ctx.model_label = rt.models.label(model)


# DashScope task ids are UUIDs; accept a little more, never a path separator.
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class NativeRequest(NamedTuple):
    """A native-body generation request, authenticated and checked."""

    key: KeyConfig
    raw: bytes
    body: dict[str, Any]
    model: str


async def read_native_request(request: web.Request, opening: Opening) -> NativeRequest:
    """What `/api/v1/services/...` and `/aliyun/v1` both do after the opening: bounded
    body, JSON object, model, allowlist, prompt limits (and the prompt for the log, if
    on)."""
    ctx, rt, key = opening
    raw = await read_body(request, rt.config.server.max_body_bytes)
    body = parse_json_object(raw)
    model = require_model(body)
    set_model(ctx, rt, model)
    rt.keyring.check_allowed(key, model)
    if rt.config.server.log_prompts:
        ctx.prompt = prompt_of(body)
    check_prompts(body)
    return NativeRequest(key, raw, body, model)


def uses_uploads(request: web.Request) -> bool:
    """Does the request reference files uploaded through `/uploads` (`oss://`)? Those live
    in one DashScope account, so the request must go where the upload policy came from."""
    return request.headers.get("X-DashScope-OssResourceResolve", "").lower() == "enable"


def prompt_of(obj: dict[str, Any]) -> str | None:
    inp = obj.get("input")
    if not isinstance(inp, dict):
        return None
    if isinstance(inp.get("prompt"), str):
        return str(inp["prompt"])
    for msg in inp.get("messages") or ():
        if isinstance(msg, dict):
            for item in msg.get("content") or ():
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    return str(item["text"])
    return None


def valid_task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if not _TASK_ID.match(task_id):
        raise invalid_parameter("task_id is not a valid task id.", "invalid_task_id")
    return task_id
