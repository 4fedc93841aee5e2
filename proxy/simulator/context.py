"""Request-level helpers shared by the handlers: the caller's origin, the faults that apply to
this request, and acting on the ones that happen before an answer is built."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .errors import FAULT_ERRORS, SimHTTPError
from .faults import Faults, parse_directives
from .state import STATE

FAULT_HEADER = "X-Sim-Fault"


class _Invalid:
    """Marker for a body that is not JSON."""


INVALID_JSON: Any = _Invalid()


def origin(request: web.Request) -> str:
    """`scheme://host[:port]` as the caller reached us, so image URLs work on any port."""
    return f"{request.scheme}://{request.host}"


def parse_json(raw: bytes) -> Any:
    """The decoded body, or `INVALID_JSON`."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return INVALID_JSON


def request_faults(request: web.Request, *, is_poll: bool) -> Faults:
    """Faults from the `X-Sim-Fault` header and the queue (prompt directives come later)."""
    header = request.headers.get(FAULT_HEADER, "")
    faults = parse_directives(header)[0] if header else Faults()
    return faults.merge(request.app[STATE].faults.take(is_poll=is_poll))


async def apply_pre_faults(request: web.Request, faults: Faults) -> None:
    """Count an injected fault, wait for `slow`, raise for `error`."""
    if not faults.active:
        return
    request.app[STATE].stats.faults_injected += 1
    if faults.slow > 0:
        await asyncio.sleep(faults.slow)
    if faults.error is not None:
        raise SimHTTPError(FAULT_ERRORS[faults.error])


def header_enabled(request: web.Request, name: str) -> bool:
    """Whether header `name` says `enable` (any case, as DashScope reads them)."""
    return request.headers.get(name, "").strip().lower() == "enable"
