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
platform's exact envelope. Other errors the gateway raises here
are OpenAI-envelope too (the pipeline picks the dialect by path); DashScope's
own errors pass through unchanged, as the platform documents.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.catalogue import SERVICE_PATHS, BodyShape, Route, resolve
from proxy.config.model import UpstreamConfig
from proxy.core.admission import admit
from proxy.core.idempotency import begin
from proxy.core.idempotency_key import json_fingerprint
from proxy.core.inbound import open_request, read_native_request, uses_uploads
from proxy.core.limits import requested_images
from proxy.core.settlement import relay_settled
from proxy.errors import only_aliyun
from proxy.jsonutil import dumps
from proxy.runtime import Routes
from proxy.upstream.call import request_headers
from proxy.upstream.failover import call_with_failover


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
    ctx, rt, _ = opening = open_request(request)
    req = await read_native_request(request, opening)
    route = resolve(req.model, rt.config.models)
    candidates = rt.router.candidates(route.target)
    if not candidates or not rt.router.knows(req.model):
        # Not a DashScope model (gpt-image-1, dall-e-3 ...), or none configured for it:
        # the hosted platform's exact answer, before any upstream call.
        raise only_aliyun()
    # A repeat with a kept answer gets it here, before any limit is used.
    content = partial(json_fingerprint, ctx.route, request.headers, req.body)
    replayed = await begin(request, rt, req.key, content)
    if replayed is not None:
        return replayed
    await admit(
        request,
        req.key,
        model=route.target,
        images=requested_images(route.target, req.body.get("parameters")),
    )
    endpoint = route.endpoint
    body = native_body(req.body, route)

    def headers_for(upstream: UpstreamConfig) -> CIMultiDict[str]:
        headers = request_headers(request.headers, upstream.api_key)
        if route.mode == "async":
            headers["X-DashScope-Async"] = "enable"
            headers.popall("X-DashScope-SSE", None)  # a task submit never streams
        else:
            headers.popall("X-DashScope-Async", None)
        return headers

    payload = req.raw if body == req.body else dumps(body)
    key, model = req.key, req.model
    # Not kept alive while DashScope works (memory per request in flight).
    del req, body, content, opening
    async with call_with_failover(
        request,
        candidates,
        endpoint.value,
        "POST",
        SERVICE_PATHS[endpoint.value],
        headers_for,
        payload,
        pinned=uses_uploads(request),
    ) as call:
        return await relay_settled(request, ctx, rt, key, model, call)


def add_routes(r: Routes) -> None:
    r.post("/aliyun/v1/images/generations", generations, name="aliyun.generations")
