"""`GET /images/{name}` (and `HEAD`): the gateway's links to the images it keeps.

No bearer key: a link is for `<img>` tags and download tools, like DashScope's own,
and works for whoever holds it until `expires`. The signature is checked first, so a
wrong or expired one is 403 whatever the name (names cannot be probed); then a valid
link to an object no longer kept, or older than `retention_days`, is 404.

What browsers and download tools expect: `Content-Type`, `Content-Length`, a strong
`ETag` (`If-None-Match` -> 304), `Cache-Control` for as long as the link is valid
(`immutable`: a name's bytes never change), `Accept-Ranges`, single `Range`s (206, or
416 when unsatisfiable). A store that fails is 503 with `Retry-After`.
"""

from __future__ import annotations

import re
import time

from aiohttp import web

from proxy.jsonutil import dumps
from proxy.runtime import RUNTIME, Routes
from proxy.storage.backend import StorageUnavailable
from proxy.storage.keeper import KEEPER
from proxy.storage.links import verify
from proxy.storage.names import is_name

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_YEAR = 365 * 86400


def _refusal(status: int, code: str, message: str) -> web.Response:
    body = {"code": code, "message": message}
    return web.Response(status=status, body=dumps(body), content_type="application/json")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """Pure: the (first, last) byte of a `Range` header; None without one (or one this
    does not serve, such as several ranges: the whole image then); False if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n and size else False
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return False
    return start, end


async def get_image(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    keeper = request.app.get(KEEPER)
    # Turned off by a reload: links already handed out keep working on the startup's.
    config = request.app[RUNTIME].current.config.storage or (keeper.config if keeper else None)
    now = time.time()
    expires = request.query.get("expires", "")
    signature = request.query.get("signature", "")
    if keeper is None or config is None:
        return _refusal(404, "NotFound", "This gateway keeps no images.")
    if not verify(config.signing_key, name, expires, signature, now):
        return _refusal(403, "AccessDenied", "The link's signature is wrong or it has expired.")
    if not is_name(name):
        return _refusal(404, "NotFound", "No such image.")
    try:
        obj = await keeper.backend.stat(name)
    except StorageUnavailable:
        unavailable = _refusal(503, "ServiceUnavailable", "The image store is unavailable.")
        unavailable.headers["Retry-After"] = "5"
        return unavailable
    if obj is None or obj.stored_at < now - config.retention_days * 86400:
        return _refusal(404, "NotFound", "This image is no longer kept.")
    etag = f'"{obj.etag}"'
    max_age = max(0, min(int(expires) - int(now), _YEAR))
    headers = {
        "ETag": etag,
        "Cache-Control": f"public, max-age={max_age}, immutable",
        "Accept-Ranges": "bytes",
        "Content-Type": obj.content_type,
    }
    if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    wanted = byte_range(request.headers.get("Range"), obj.size)
    if wanted is False:
        headers["Content-Range"] = f"bytes */{obj.size}"
        return web.Response(status=416, headers=headers)
    first, last = wanted if isinstance(wanted, tuple) else (0, obj.size - 1)
    status = 206 if isinstance(wanted, tuple) else 200
    if status == 206:
        headers["Content-Range"] = f"bytes {first}-{last}/{obj.size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = last - first + 1
    await response.prepare(request)
    if request.method != "HEAD":
        try:
            async for chunk in keeper.backend.read(name, first, last):
                await response.write(chunk)
        except StorageUnavailable:
            # Headers are sent: close, so the client sees a truncated image, not a whole one.
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response


def add_routes(r: Routes) -> None:
    r.get("/images/{name}", get_image, name="images.get")  # and HEAD
