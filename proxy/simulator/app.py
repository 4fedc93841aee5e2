"""`create_sim_app(settings)`: the simulator's aiohttp application.

Routes (DashScope's, under `/api/v1`):
  E1 POST /services/aigc/multimodal-generation/generation   sync JSON or SSE
  E2 POST /services/aigc/image-generation/generation        async submit
  E3 POST /services/aigc/text2image/image-synthesis         async submit, or `sync_call`
  E4 POST /services/aigc/image2image/image-synthesis        async submit
  E5 GET  /tasks/{task_id}     E6 POST /tasks/{task_id}/cancel     E7 GET /tasks
  E8 GET  /uploads?action=getPolicy&model=M
and the simulator's own, outside `/api/`: `/_sim/oss` (upload host), `/_sim/images/*.png`
(signed result images), `/_sim/requests`, `/_sim/stats`, `/_sim/faults`, `/_sim/reset`,
`/_sim/expire-images`.

One middleware gives every request an id, records `/api/` requests, checks the bearer key and
renders every DashScope error; a response-prepare hook adds DashScope's response headers.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import support, task_routes
from .catalogue import Endpoint
from .context import header_enabled, parse_json
from .errors import (
    INVALID_API_KEY,
    NO_API_KEY,
    NOT_FOUND,
    TOO_LARGE,
    URL_ERROR,
    SimHTTPError,
)
from .generation import generation_handler
from .render import error_response
from .settings import SimSettings
from .state import OWNER, REQUEST_ID, STARTED, STATE, STREAMING, SimState

API_BASE = "/api/v1"
# Base64 input images can be large (DashScope allows 10 MB per image, several per request).
CLIENT_MAX_SIZE = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authenticate(request: web.Request, settings: SimSettings) -> str:
    """The caller's API key from `Authorization: Bearer <key>`, or raise 401 InvalidApiKey."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if not header.strip():
        raise SimHTTPError(NO_API_KEY)
    if scheme.lower() != "bearer" or not key:
        raise SimHTTPError(INVALID_API_KEY)
    if settings.api_keys and not any(
        hmac.compare_digest(key.encode(), known.encode()) for known in settings.api_keys
    ):
        raise SimHTTPError(INVALID_API_KEY)
    return key


def _route_label(request: web.Request) -> str:
    """The route pattern (no ids), for the per-path counters."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"


async def _record(request: web.Request, state: SimState) -> None:
    """Read the body (so size limits apply here) and keep the request for `/_sim/requests`."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise SimHTTPError(TOO_LARGE) from None
    if state.settings.zero_delay or state.records.maxlen == 0:
        return
    body = parse_json(raw) if raw else None
    state.records.append(
        {
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": dict(request.headers),
            "body": body if isinstance(body, dict | list) else None,
            "body_length": len(raw),
        }
    )


@web.middleware
async def sim_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    request[REQUEST_ID] = str(uuid.uuid4())
    request[STARTED] = time.monotonic()
    request[STREAMING] = header_enabled(request, "X-DashScope-SSE")
    state.stats.requests[_route_label(request)] += 1
    try:
        if request.path.startswith("/api/"):
            await _record(request, state)
            if request.match_info.http_exception is not None:
                raise SimHTTPError(URL_ERROR if "/services/" in request.path else NOT_FOUND)
            request[OWNER] = authenticate(request, state.settings)
        return await handler(request)
    except SimHTTPError as exc:
        return error_response(request, exc.error)


async def _dashscope_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers real DashScope sends on every answer."""
    if REQUEST_ID not in request:
        return
    response.headers["x-request-id"] = request[REQUEST_ID]
    response.headers["x-dashscope-call-gateway"] = "true"
    cost_ms = int((time.monotonic() - request[STARTED]) * 1000)
    response.headers["req-cost-time"] = str(cost_ms)


def create_sim_app(settings: SimSettings | None = None) -> web.Application:
    """A DashScope simulator application configured by `settings`."""
    settings = settings or SimSettings()
    app = web.Application(middlewares=[sim_middleware], client_max_size=CLIENT_MAX_SIZE)
    app[STATE] = SimState.create(settings)
    app.on_response_prepare.append(_dashscope_headers)

    services = f"{API_BASE}/services/aigc"
    router = app.router
    router.add_post(
        f"{services}/multimodal-generation/generation", generation_handler(Endpoint.MULTIMODAL)
    )
    router.add_post(
        f"{services}/image-generation/generation", generation_handler(Endpoint.IMAGE_GENERATION)
    )
    router.add_post(
        f"{services}/text2image/image-synthesis", generation_handler(Endpoint.TEXT2IMAGE)
    )
    router.add_post(
        f"{services}/image2image/image-synthesis", generation_handler(Endpoint.IMAGE2IMAGE)
    )
    router.add_get(f"{API_BASE}/tasks/{{task_id}}", task_routes.get_task)
    router.add_post(f"{API_BASE}/tasks/{{task_id}}/cancel", task_routes.cancel_task)
    router.add_get(f"{API_BASE}/tasks", task_routes.list_tasks)
    router.add_get(f"{API_BASE}/tasks/", task_routes.list_tasks)
    router.add_get(f"{API_BASE}/uploads", support.get_policy)

    router.add_post("/_sim/oss", support.upload)
    router.add_get("/_sim/images/{name}.png", support.image)
    router.add_get("/_sim/requests", support.list_requests)
    router.add_delete("/_sim/requests", support.clear_requests)
    router.add_get("/_sim/stats", support.stats)
    router.add_get("/_sim/faults", support.list_faults)
    router.add_post("/_sim/faults", support.queue_fault)
    router.add_delete("/_sim/faults", support.clear_faults)
    router.add_post("/_sim/reset", support.reset)
    router.add_post("/_sim/expire-images", support.expire_images)
    return app
