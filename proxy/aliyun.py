"""`POST /aliyun/v1/images/generations`: the native DashScope body at one path for every model.

The client sends what it would send DashScope (`model`, `input.messages`,
`parameters`); the gateway picks the DashScope endpoint from the routing table
(`model_table`): the sync multimodal-generation endpoint, or the async task
endpoint of the model's family (image-generation for wan2.6, text2image /
image2image for the `input.prompt` families, whose body is rewritten from the
messages form). The upstream answer is relayed unchanged and settled like a
native call: sync answers are metered from `usage.image_count`, submitted
tasks are recorded for the key, so `GET /api/v1/tasks/{task_id}` with the same
key polls (and meters) them.

A model that no configured upstream serves is refused with the hosted
platform's exact envelope (seed 000). Other errors the gateway raises here
are OpenAI-envelope too (the middleware picks the dialect by path); DashScope's
own errors pass through unchanged, as the platform documents.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from . import native
from .admission import admit
from .auth import check_model_allowed
from .config import UpstreamConfig
from .errors import GatewayError
from .failover import call_with_failover
from .inbound import parse_json_object, read_body, require_model
from .input_limits import check_prompts
from .jsonutil import dumps
from .limits import requested_images
from .model_table import BodyShape, Route, resolve
from .relay import Relayed, relay_response
from .runtime import CTX, METRICS, RUNTIME
from .upstream import request_headers

ONLY_ALIYUN = "only aliyun channel is supported on /aliyun/v1/images/generations"


def only_aliyun() -> GatewayError:
    """Seed 000's envelope for a model no configured (Aliyun) upstream serves."""
    return GatewayError(
        400,
        "InvalidParameter",
        ONLY_ALIYUN,
        openai_type="invalid_request_error",
        openai_code="invalid_request",
    )


def native_body(obj: dict[str, Any], route: Route) -> dict[str, Any]:
    """Pure: the body for `route`'s endpoint. The alias's target replaces `model`; for the
    `input.prompt` families the single user message becomes `input.prompt` (+ `images`)."""
    out = dict(obj)
    out["model"] = route.target
    if route.shape is not BodyShape.PROMPT:
        return out
    inp = obj.get("input")
    if not isinstance(inp, dict) or "prompt" in inp or not isinstance(inp.get("messages"), list):
        return out  # already the prompt form, or malformed: DashScope answers for itself
    texts: list[str] = []
    images: list[str] = []
    for message in inp["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        for item in content if isinstance(content, list) else ():
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif isinstance(item, dict) and isinstance(item.get("image"), str):
                images.append(item["image"])
    new_input: dict[str, Any] = {k: v for k, v in inp.items() if k != "messages"}
    new_input["prompt"] = "\n".join(texts)
    if images:
        new_input["images"] = images
    params = obj.get("parameters")
    if isinstance(params, dict) and "negative_prompt" in params:
        # The prompt families take the negative prompt in `input`.
        new_input.setdefault("negative_prompt", params["negative_prompt"])
        out["parameters"] = {k: v for k, v in params.items() if k != "negative_prompt"}
    out["input"] = new_input
    return out


async def generations(request: web.Request) -> web.StreamResponse:
    ctx = request[CTX]
    rt = request.app[RUNTIME].current
    key = native._authenticate(request, rt, ctx)
    raw = await read_body(request, rt.config.server.max_body_bytes)
    obj = parse_json_object(raw)
    model = require_model(obj)
    native._set_model(ctx, rt, model)
    check_model_allowed(key, model)
    if rt.config.server.log_prompts:
        ctx.prompt = native._prompt_of(obj)
    route = resolve(model, rt.config.models)
    candidates = rt.router.candidates(route.target)
    if not candidates:
        raise only_aliyun()
    check_prompts(obj)
    await admit(
        request,
        key,
        model=route.target,
        images=requested_images(route.target, obj.get("parameters")),
    )
    endpoint = route.endpoint
    body = native_body(obj, route)

    def headers_for(upstream: UpstreamConfig) -> CIMultiDict[str]:
        headers = request_headers(request.headers, upstream.api_key)
        if route.mode == "async":
            headers["X-DashScope-Async"] = "enable"
            headers.popall("X-DashScope-SSE", None)  # a task submit never streams
        else:
            headers.popall("X-DashScope-Async", None)
        return headers

    payload = raw if body == obj else dumps(body)
    async with call_with_failover(
        request,
        candidates,
        endpoint.value,
        "POST",
        native.SERVICE_ROUTES[endpoint.value],
        headers_for,
        payload,
        pinned=native.uses_uploads(request),
    ) as call:
        upstream = call.upstream

        async def settled(relayed: Relayed) -> None:
            await native.settle(request, ctx, rt, key, model, upstream, relayed)

        relayed = await relay_response(
            request, call.response, request.app[METRICS], upstream, settle=settled
        )
    return relayed.response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/aliyun/v1/images/generations", generations, name="aliyun.generations")
