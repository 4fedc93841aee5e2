"""The simulator's own endpoints: uploads (E8 `getPolicy` and the OSS-style upload host),
signed result images, and the test-support `/_sim/*` API (requests, stats, faults, reset,
expire-images).

Image and upload URLs point back at this server (the request's own Host, or for images
`public_base_url` when set), so they work on any port and need no auth, like pre-signed OSS
URLs.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import datetime
from typing import Any

from aiohttp import BodyPartReader, web

from .context import apply_pre_faults, origin, parse_json, request_faults
from .errors import SimHTTPError, invalid
from .faults import parse_directives
from .render import JSON_TYPE, json_response
from .responses import CST, dumps, policy_body
from .signing import check_image_signature, check_policy, make_policy, parse_image_name
from .state import OWNER, REQUEST_ID, STATE, Stats

POLICY_SECONDS = 300
MAX_FAULT_COUNT = 1_000_000


def _oss_error(status: int, code: str, message: str) -> web.Response:
    """OSS answers errors in XML; the SDK only checks the status."""
    body = f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code>"
    body += f"<Message>{message}</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml")


async def get_policy(request: web.Request) -> web.StreamResponse:
    """E8 `GET /uploads?action=getPolicy&model=M`: an upload policy for our own upload host."""
    state = request.app[STATE]
    faults = request_faults(request, is_poll=False)
    await apply_pre_faults(request, faults)
    if request.query.get("action") != "getPolicy":
        raise SimHTTPError(invalid("The parameter action must be getPolicy."))
    if not request.query.get("model"):
        raise SimHTTPError(invalid("The parameter model is required."))
    owner_dir = hashlib.sha256(request[OWNER].encode()).hexdigest()[:16]
    day = datetime.fromtimestamp(time.time(), tz=CST).strftime("%Y-%m-%d")
    upload_dir = f"dashscope-instant/{owner_dir}/{day}/{uuid.uuid4()}"
    policy, signature = make_policy(state.signer, upload_dir, int(time.time()) + POLICY_SECONDS)
    body = policy_body(
        request[REQUEST_ID],
        policy=policy,
        signature=signature,
        upload_dir=upload_dir,
        upload_host=f"{origin(request)}/_sim/oss",
    )
    return await json_response(request, body, faults)


async def upload(request: web.Request) -> web.Response:
    """The upload host: an OSS-style multipart form POST, authorised by the signed policy."""
    state = request.app[STATE]
    if not request.content_type.startswith("multipart/"):
        return _oss_error(400, "InvalidArgument", "Expected a multipart form.")
    fields: dict[str, str] = {}
    data: bytes | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # nested multipart: not OSS
            return _oss_error(400, "InvalidArgument", "Nested multipart is not supported.")
        if part.name == "file":
            data = await part.read()
        elif part.name:
            fields[part.name] = await part.text()
    key = fields.get("key", "")
    if data is None or not key:
        return _oss_error(400, "InvalidArgument", "The key and file fields are required.")
    if not check_policy(
        state.signer, fields.get("policy", ""), fields.get("Signature", ""), key, time.time()
    ):
        return _oss_error(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
    state.uploads.put(key, data, fields.get("x-oss-content-type", "application/octet-stream"))
    state.stats.uploads += 1
    wanted = fields.get("success_action_status", "")
    return web.Response(status=int(wanted) if wanted in ("200", "201", "204") else 204)


async def image(request: web.Request) -> web.Response:
    """A result image at its signed URL; expired or bad signature -> 403 (like OSS)."""
    state = request.app[STATE]
    name = request.match_info["name"]
    expires = request.query.get("Expires", "")
    signature = request.query.get("Signature", "")
    parsed = parse_image_name(name)
    if parsed is None:
        return _oss_error(403, "SignatureDoesNotMatch", "The request signature does not match.")
    if not check_image_signature(state.image_signer, name, expires, signature):
        if any(
            check_image_signature(old, name, expires, signature)
            for old in state.retired_image_signers
        ):  # signed before `POST /_sim/expire-images`
            return _oss_error(403, "AccessDenied", "Request has expired.")
        return _oss_error(403, "SignatureDoesNotMatch", "The request signature does not match.")
    if not expires.isdigit() or time.time() > int(expires):
        return _oss_error(403, "AccessDenied", "Request has expired.")
    png = state.pngs.get(*parsed)
    return web.Response(
        body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


def _sim_json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(body), headers={"Content-Type": JSON_TYPE})


async def list_requests(request: web.Request) -> web.Response:
    """`GET /_sim/requests`: the last `record_limit` requests under `/api/`, oldest first."""
    return _sim_json({"requests": list(request.app[STATE].records)})


async def clear_requests(request: web.Request) -> web.Response:
    request.app[STATE].records.clear()
    return _sim_json({"cleared": True})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    counters = state.stats
    return _sim_json(
        {
            "requests_by_path": dict(counters.requests),
            "images_generated": counters.images_generated,
            "tasks_created": counters.tasks_created,
            "tasks_live": len(state.tasks),
            "faults_injected": counters.faults_injected,
            "uploads": counters.uploads,
            "queued_faults": state.faults.snapshot(),
        }
    )


async def queue_fault(request: web.Request) -> web.Response:
    """`POST /_sim/faults` `{"fault": "error=503", "count": 2, "polls": false}`."""
    body = parse_json(await request.read())
    if not isinstance(body, dict) or not isinstance(body.get("fault"), str):
        return _sim_json({"error": 'expected {"fault": "error=503", "count": 1}'}, 400)
    count = body.get("count", 1)
    polls = body.get("polls", False)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_FAULT_COUNT:
        return _sim_json({"error": f"count must be an integer in 1..{MAX_FAULT_COUNT}"}, 400)
    if not isinstance(polls, bool):
        return _sim_json({"error": "polls must be a boolean"}, 400)
    faults, problems = parse_directives(body["fault"])
    if problems or not faults.active:
        return _sim_json({"error": "; ".join(problems) or "no directive given"}, 400)
    state = request.app[STATE]
    state.faults.push(faults, count, polls=polls, text=body["fault"])
    return _sim_json({"queued": state.faults.snapshot()})


async def list_faults(request: web.Request) -> web.Response:
    return _sim_json({"queued": request.app[STATE].faults.snapshot()})


async def clear_faults(request: web.Request) -> web.Response:
    request.app[STATE].faults.clear()
    return _sim_json({"queued": []})


async def expire_images(request: web.Request) -> web.Response:
    """`POST /_sim/expire-images`: every image URL handed out so far now answers 403, as an
    expired OSS URL does; URLs handed out afterwards (a task polled again included) work."""
    request.app[STATE].expire_images()
    return _sim_json({"expired": True})


async def reset(request: web.Request) -> web.Response:
    """`POST /_sim/reset`: forget requests, queued faults and counters (tasks are kept)."""
    state = request.app[STATE]
    state.records.clear()
    state.faults.clear()
    state.stats = Stats()
    return _sim_json({"reset": True})
