"""Request-level helpers shared by the handlers: the caller's origin, the faults that apply to
this request, acting on the ones that happen before an answer is built, and turning a result's
image names into what its answer shows (`Produced`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .catalogue import Endpoint
from .errors import FAULT_ERRORS, SimHTTPError
from .faults import AnswerShape, Faults, parse_directives
from .models import GenRequest
from .png import data_url
from .results import Produced
from .state import STATE

FAULT_HEADER = "X-Sim-Fault"


class _Invalid:
    """Marker for a body that is not JSON."""


INVALID_JSON: Any = _Invalid()


def origin(request: web.Request) -> str:
    """`scheme://host[:port]` as the caller reached us, so image URLs work on any port."""
    return f"{request.scheme}://{request.host}"


def image_origin(request: web.Request) -> str:
    """Where result-image URLs point: `public_base_url` when set, else the caller's origin."""
    base = request.app[STATE].settings.public_base_url
    return base.rstrip("/") if base else origin(request)


def produce(
    request: web.Request,
    req: GenRequest,
    seed: int,
    names: tuple[str, ...],
    shape: AnswerShape,
    expires: int,
) -> Produced:
    """The images of a finished result as its answer shows them.

    `base64` and `textitem` reshape content items, so they apply only where an answer has
    them (E1, E2); E3/E4 `results[].url` stay URLs. `nocount` applies everywhere.
    """
    state = request.app[STATE]
    content_items = req.endpoint in (Endpoint.MULTIMODAL, Endpoint.IMAGE_GENERATION)
    inline = shape.inline_images and content_items
    if inline:
        # Image i of a result is drawn from (seed, i), exactly as its URL would serve it.
        refs = tuple(data_url(state.pngs.get(seed, index)) for index in range(len(names)))
    else:
        refs = tuple(state.image_urls(image_origin(request), names, expires))
    return Produced(
        refs, inline=inline, text_last=shape.text_item and content_items, no_count=shape.no_count
    )


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
