"""The OpenAI-compatible images API under `/v1`: what the OpenAI SDK calls.

- `POST /v1/images/generations` (JSON): translated to the DashScope endpoint the
  routing table names for the model. Sync models answer `{"created", "data",
  "usage"}`; models DashScope runs as tasks are submitted and polled by the
  gateway up to `openai.sync_wait_seconds`, so the SDK still gets `data[]`;
  `async_only` models answer the hosted platform's task object at once. An `image` field
  makes it an edit.
- `GET /v1/images/generations/{task_id}`: a task's progress and, when done, its
  `data[]`; only for the key that submitted it, for `openai.task_retention_seconds`.
- `POST /v1/images/edits` (multipart, as `images.edit` sends it): `image` or
  repeated `image[]` parts become data URLs for an edit-capable model.
- `GET /v1/models`: the models this key may use.

Every handler is the same straight line: authenticate, parse and validate
(pure, `openai_translate`), resolve the route (`model_table`), call DashScope
(`generation`), translate back, fetch images for `b64_json` (`image_fetch`).
Errors are raised as `GatewayError`s; the request pipeline renders them in the
OpenAI envelope.

Metering: once per generated image, when DashScope reports it (sync answer,
or the first poll showing the task SUCCEEDED), before any `b64_json` fetch:
DashScope has billed the images even if a fetch then fails, so the count
stands and the client gets an error naming the image it could not get.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.catalogue import TABLE, Route, resolve
from proxy.config.model import KeyConfig, UpstreamConfig
from proxy.core.admission import admit, task_created
from proxy.core.idempotency import begin
from proxy.core.idempotency_key import MultipartDigest, json_fingerprint
from proxy.core.inbound import (
    open_request,
    parse_json_object,
    read_body,
    set_model,
    valid_task_id,
)
from proxy.core.input_limits import check_prompt
from proxy.core.keeping import keep_images, read_kept, storage_headers
from proxy.errors import (
    no_upstream,
    too_large,
    unknown_model,
    upstream_bad_answer,
    upstream_unavailable,
)
from proxy.fronts.openai import generation, usage
from proxy.fronts.openai.errors import bad_request, task_error, task_not_found
from proxy.fronts.openai.input_images import data_url
from proxy.fronts.openai.translate import (
    ImageRequest,
    ResultImage,
    check_against,
    dashscope_body,
    images_of,
    openai_response,
    openai_usage,
    parse_request,
    task_object,
)
from proxy.jsonutil import base64_string, dumps, loads
from proxy.runtime import (
    SESSION,
    TASKS,
    RequestContext,
    Routes,
    Runtime,
)
from proxy.state.tasks import TaskRecord
from proxy.upstream.fetch import FetchPolicy, fetch_all

# The hosted platform's default model; the OpenAI SDK may omit `model`.
DEFAULT_MODEL = "qwen-image-2.0"
DEFAULT_EDIT_MODEL = "qwen-image-edit-plus"
# Prompts kept in a task's record (echoed in the task object) are cut here.
_META_PROMPT_MAX = 4000
# Multipart form fields that are files; every other part is a string field.
_FILE_PARTS = frozenset({"image", "image[]", "mask", "markup"})
_MAX_FIELD_BYTES = 64 * 1024


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=dumps(body), content_type="application/json", headers=headers
    )


# --------------------------------------------------------------------- generations


async def generations(request: web.Request) -> web.StreamResponse:
    """POST /v1/images/generations."""
    ctx, rt, key = open_request(request)
    obj = parse_json_object(await read_body(request, rt.config.server.max_body_bytes))
    req = parse_request(
        obj, default_model=DEFAULT_MODEL, default_format=rt.config.openai.default_response_format
    )
    return await _generate(
        request, ctx, rt, key, req, lambda: json_fingerprint(ctx.route, request.headers, obj)
    )


async def _generate(
    request: web.Request,
    ctx: RequestContext,
    rt: Runtime,
    key: KeyConfig,
    req: ImageRequest,
    content: Callable[[], str],
) -> web.StreamResponse:
    set_model(ctx, rt, req.model)
    rt.keyring.check_allowed(key, req.model)
    if rt.config.server.log_prompts:
        ctx.prompt = req.prompt
    route = resolve(req.model, rt.config.models)
    check_against(req, route)
    check_prompt(req.prompt)  # absurd prompts are refused for any name
    if not rt.router.knows(req.model):
        raise unknown_model(req.model)
    candidates = rt.router.candidates(route.target)
    if not candidates:
        raise no_upstream(route.target)
    # A repeat with a kept answer gets it here, before any limit is used.
    replayed = await begin(request, rt, key, content)
    if replayed is not None:
        return replayed
    await admit(request, key, model=route.target, images=req.n)  # per-key limits
    body = dashscope_body(req, route)
    created = int(time.time())
    if route.mode == "sync":
        answer = await generation.call_sync(
            request, ctx, key, req.model, candidates, route.endpoint, body
        )
    else:
        meta = _meta(req, created, sync=not route.async_only)
        record = await generation.submit(
            request, ctx, key, req.model, candidates, route.endpoint, body, meta
        )
        if route.async_only:
            await task_created(request, record.task_id)  # its images stay reserved
            return _json(task_object(record.task_id, record.status, loads(meta), req.model))
        answer = await generation.wait_for(
            request, ctx, record, _task_upstream(rt, record), rt.config.openai.sync_wait_seconds
        )
    rt.models.seen_succeeding(req.model)
    ctx.model_label = rt.models.label(req.model)
    result = await _result(request, rt, created, answer, req.response_format)
    return _json(result, headers=storage_headers(request))


def _meta(req: ImageRequest, created: int, *, sync: bool) -> str:
    """What a task object needs later, kept with the task record (opaque to the store)."""
    return dumps(
        {
            "api": "openai",
            "prompt": req.prompt[:_META_PROMPT_MAX],
            "size": req.openai_size,
            "quality": req.quality,
            "mode": req.mode,
            "response_format": req.response_format,
            "created_at": created,
            "sync": sync,
        }
    ).decode()


async def _result(
    request: web.Request, rt: Runtime, created: int, answer: Any, response_format: str
) -> dict[str, Any]:
    """The OpenAI answer for a finished DashScope answer: every image, fetched for b64_json.

    With `storage:` every image is kept first: `url` answers carry the gateway's links,
    `b64_json` answers are read back from the store (DashScope is fetched once); an
    image that could not be kept keeps DashScope's URL (or is fetched from it)."""
    images: list[ResultImage] = images_of(answer)
    if not images:
        raise upstream_bad_answer("DashScope reported success but returned no image.", "no_image")
    kept = await keep_images(request, [i.url for i in images])
    b64 = None
    if response_format == "b64_json":
        config = rt.config
        policy = FetchPolicy.build(config.openai.image_fetch, config.upstreams)
        slots = kept if kept is not None else [None] * len(images)
        data = [await read_kept(request, k.name, policy.max_bytes) if k else None for k in slots]
        missing = [i.url for i, d in zip(images, data, strict=True) if d is None]
        fetched = iter(await fetch_all(request.app[SESSION], missing, policy) if missing else [])
        b64 = [base64_string(d if d is not None else next(fetched)) for d in data]
    elif kept is not None:
        images = [replace(i, url=k.link) if k else i for i, k in zip(images, kept, strict=True)]
    return openai_response(created, images, b64, openai_usage(answer, len(images)))


# -------------------------------------------------------------------- async tasks


async def get_task(request: web.Request) -> web.StreamResponse:
    """GET /v1/images/generations/{task_id}: progress, then the result `data[]`."""
    ctx, rt, key = open_request(request)
    task_id = valid_task_id(request)
    record = await request.app[TASKS].get(task_id)
    meta = _read_meta(record)
    # Another key's task is answered exactly like an id that does not exist.
    if (
        record is None
        or meta is None
        or record.key != key.name
        or time.time() - record.created_at > rt.config.openai.task_retention_seconds
    ):
        raise task_not_found(task_id)
    set_model(ctx, rt, record.model)
    upstream = _task_upstream(rt, record)
    ctx.upstream = upstream.name
    answer = await generation.poll_once(request, ctx, record, upstream)
    if answer.status != 200:
        raise answer.error()
    status = generation.task_status(answer.body) or "UNKNOWN"
    body = task_object(task_id, status, meta, record.model)
    if status == "SUCCEEDED":
        result = await _result(
            request,
            rt,
            int(meta.get("created_at", 0)),
            answer.body,
            str(meta.get("response_format", "url")),
        )
        body.update(data=result["data"], usage=result["usage"])
        return _json(body, headers=storage_headers(request))
    if status in ("FAILED", "CANCELED"):
        body["error"] = task_error(answer.body).openai_body()["error"]
    elif status == "UNKNOWN":
        body["error"] = {
            "message": "DashScope no longer has this task (results are kept 24 hours).",
            "type": "invalid_request_error",
            "code": "task_expired",
        }
    return _json(body)


def _read_meta(record: TaskRecord | None) -> dict[str, Any] | None:
    if record is None or not record.meta:
        return None
    try:
        meta = loads(record.meta)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("api") == "openai" else None


def _task_upstream(rt: Runtime, record: TaskRecord) -> UpstreamConfig:
    upstream = rt.router.by_name(record.upstream)
    if upstream is None:
        raise upstream_unavailable(
            f"upstream {record.upstream!r} that created this task is no longer configured"
        )
    return upstream


# --------------------------------------------------------------------------- edits


async def edits(request: web.Request) -> web.StreamResponse:
    """POST /v1/images/edits: multipart/form-data exactly as the OpenAI SDK sends it."""
    ctx, rt, key = open_request(request)
    digest = MultipartDigest(ctx.route, request.headers)
    fields, images = await _read_form(request, rt.config.server.max_body_bytes, digest)
    if not images:
        raise bad_request(
            "image is required: send one `image` file part or repeated `image[]` parts."
        )
    req = parse_request(
        fields,
        default_model=DEFAULT_EDIT_MODEL,
        default_format=rt.config.openai.default_response_format,
        images=tuple(images),
    )
    return await _generate(request, ctx, rt, key, req, digest.hexdigest)


async def _read_form(
    request: web.Request, limit: int, digest: MultipartDigest
) -> tuple[dict[str, str], list[str]]:
    """String fields, and image parts as data URLs, in order (each part also fed to
    `digest`, the request's content for `Idempotency-Key`). Masks are refused: DashScope's
    edit models take the instruction from the prompt, not from a mask."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if not request.content_type.startswith("multipart/form-data"):
        raise bad_request(
            "/v1/images/edits takes multipart/form-data (as the OpenAI SDK's images.edit sends it)."
        )
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError):
        raise bad_request("The multipart body could not be read.") from None
    fields: dict[str, str] = {}
    images: list[str] = []
    total = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, HttpProcessingError):  # e.g. a part header aiohttp cannot parse
            raise bad_request("The multipart body could not be read.") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader) or not part.name:
            raise bad_request("Nested multipart bodies are not supported.")
        name = part.name
        is_file = name in _FILE_PARTS
        data = await _read_part(part, limit - total if is_file else _MAX_FIELD_BYTES)
        if data is None:
            raise too_large(limit) if is_file else bad_request(f"Form field {name} is too long.")
        total += len(data)
        if total > limit:
            raise too_large(limit)
        digest.part(name, part.headers.get("Content-Type") if is_file else None, data)
        if name in ("image", "image[]"):
            mime = part.headers.get("Content-Type")
            images.append(data_url(data, mime, f"image[{len(images)}]"))
        elif name == "mask":
            raise bad_request(
                "mask is not supported: DashScope's edit models take the "
                "instruction from the prompt; describe the change there."
            )
        elif name == "markup":
            raise bad_request("markup is not supported by DashScope's edit models.")
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"Form field {name} is not UTF-8 text.") from None
    return fields, images


async def _read_part(part: BodyPartReader, cap: int) -> bytes | None:
    """The part's bytes, or None as soon as it is longer than `cap`."""
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(64 * 1024)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            return None


# -------------------------------------------------------------------------- models


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: the image models this key may use, in OpenAI's list format.

    A model is listed when the key's allowlist admits it and some upstream
    serves the DashScope model it resolves to: the routing table's models and
    the config's `models:` names (aliases included).
    """
    ctx, rt, key = open_request(request)
    names = sorted(set(TABLE) | set(rt.config.models))
    data = []
    for name in names:
        route: Route = resolve(name, rt.config.models)
        if not key.allows(name) or not rt.router.candidates(route.target):
            continue
        item: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "dashscope",
        }
        if route.target != name:
            item["owned_by"] = "dashscope-proxy"
            item["target"] = route.target
        data.append(item)
    return _json({"object": "list", "data": data})


def add_routes(app: web.Application, r: Routes, prefix: str = "/v1") -> None:
    r.post(prefix + "/images/generations", generations, name="openai.generations")
    r.get(prefix + "/images/generations/{task_id}", get_task, name="openai.tasks.get")
    r.post(prefix + "/images/edits", edits, name="openai.edits")
    r.get(prefix + "/models", list_models, name="openai.models")
    usage.add_routes(app, r, prefix)  # GET /v1/usage
