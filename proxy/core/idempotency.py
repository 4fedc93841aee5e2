"""Paid once: a request with an `Idempotency-Key` runs once, and its answer is replayed.

Every generation handler calls `begin` once, after authentication and reading the
body, before admission (so a replay uses no limit or quota):

- no header: nothing happens (`None`);
- a malformed header: 400, nothing run;
- the first request with this key (for this gateway key): the claim is taken, atomically
  across replicas (`proxy.state.idempotency`), and the request runs (`None`);
- a repeat with the same content whose answer is kept: that answer, with
  `Idempotency-Replayed: true` and `dashscope_proxy_idempotent_replays_total{key}`
  (no upstream call, no count, no limit);
- the same key with other content: 422; a repeat while the first still runs: 409 with
  `Retry-After`; a claim whose lease ran out with no answer (its process died while
  DashScope was answering): 410, because the outcome is unknown and running it again
  could generate the images twice.

What is kept is what the client received, captured at the two places answers leave
the gateway: the request pipeline (`finish`, every `web.Response`, the errors it rendered
included) and the relay's streamed answers (`upstream.relay.Capture`, sealed before
the client sees the end). It is kept only if the request reached DashScope
(`RequestContext.sent`, set by failover); refusals made before that (limits,
validation, no upstream, DashScope's throttling) release the claim, so a corrected
retry runs. An answer that cannot be replayed (larger than
`idempotency.max_answer_bytes`, cut short mid-stream, or lost in a drain) is kept
as a 410 in the caller's dialect, for the same reason as an expired lease.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import KeyConfig
from proxy.core.idempotency_key import (
    HEADER,
    REPLAYED,
    answer_not_kept,
    check_key,
    in_progress,
    key_reused,
    scope_of,
)
from proxy.errors import GatewayError, dialect_for, render_error, state_unavailable
from proxy.runtime import CTX, METRICS, STATE, Runtime
from proxy.state.idempotency import IdempotencyStore, KeptAnswer
from proxy.upstream.relay import CAPTURE, Capture

log = logging.getLogger(__name__)

# Answer headers a replay repeats (the rest describe the connection or the first request).
KEPT_HEADERS = ("Content-Type", "Retry-After", "X-DashScope-Proxy-Storage")
_LOST = (
    "its answer was lost (the gateway stopped while DashScope was answering), so whether "
    "images were generated is unknown."
)


@dataclass(slots=True)
class Claimed:
    """The claim this request holds: where it is, and what keeping its answer needs."""

    store: IdempotencyStore
    scope: str
    token: str
    ttl: float
    limit: int
    done: bool = False


CLAIMED = web.RequestKey("idempotency_claim", Claimed)


async def begin(
    request: web.Request, rt: Runtime, key: KeyConfig, content: Callable[[], str]
) -> web.StreamResponse | None:
    """The replay of a kept answer, or None: run the request (holding the claim if it
    carries a key). `content()` is the request's content digest (computed only when it
    carries a key). Raises the 400, 409, 410 and 422 the module docstring lists."""
    value = check_key(request.headers.getall(HEADER, []))
    if value is None:
        return None
    store = request.app[STATE].idempotency
    settings = rt.config.idempotency
    scope = scope_of(key.name, value)
    fingerprint = content()
    token = secrets.token_hex(8)
    try:
        entry = await store.claim(
            scope, fingerprint, token, rt.config.idempotency_lease, settings.ttl_seconds
        )
    except GatewayError:
        raise
    except Exception:
        log.exception("claiming an %s failed", HEADER)
        raise state_unavailable() from None
    if entry is None:
        claimed = Claimed(store, scope, token, settings.ttl_seconds, settings.max_answer_bytes)
        request[CLAIMED] = claimed
        request[CAPTURE] = Capture(claimed.limit, partial(_seal, request, claimed))
        return None
    if entry.fingerprint != fingerprint:
        raise key_reused()
    if entry.answer is None:
        if time.time() < entry.lease_until:
            raise in_progress()
        raise answer_not_kept(_LOST)
    request.app[METRICS].idempotent_replays.labels(key.name).inc()
    return replay(entry.answer)


def replay(answer: KeptAnswer) -> web.Response:
    """The kept answer as a response, marked as a replay."""
    headers: CIMultiDict[str] = CIMultiDict(answer.headers)
    headers[REPLAYED] = "true"
    return web.Response(status=answer.status, body=answer.body, headers=headers)


def _kept_headers(response: web.StreamResponse) -> tuple[tuple[str, str], ...]:
    return tuple(
        (name, response.headers[name]) for name in KEPT_HEADERS if name in response.headers
    )


def _not_kept(request: web.Request, why: str) -> KeptAnswer:
    """A 410 in the caller's dialect, kept in place of an answer that cannot be replayed."""
    ctx = request[CTX]
    rendered = render_error(
        answer_not_kept(why), dialect_for(ctx.route, request.path), ctx.request_id
    )
    body = rendered.body if isinstance(rendered.body, bytes) else b""  # always bytes
    return KeptAnswer(rendered.status, _kept_headers(rendered), body)


def _too_large(size: int, limit: int) -> str:
    return (
        f"its answer ({size} bytes) was larger than the {limit} bytes the gateway keeps "
        "(idempotency.max_answer_bytes)."
    )


async def finish(request: web.Request, response: web.StreamResponse | None) -> None:
    """The request ended with `response` (None: cut without one): keep its answer if it
    reached DashScope, else release the claim. Called by the request pipeline for every
    request; a no-op without a claim or once the relay sealed it. Never raises."""
    claimed = request.get(CLAIMED)
    if claimed is None or claimed.done:
        return
    if not request[CTX].sent:
        claimed.done = True
        await _release(claimed)
        return
    body = response.body if isinstance(response, web.Response) else None
    if response is None:
        answer = _not_kept(request, _LOST)
    elif not isinstance(body, bytes):
        answer = _not_kept(request, "its answer was streamed and could not be kept.")
    elif len(body) > claimed.limit:
        answer = _not_kept(request, _too_large(len(body), claimed.limit))
    else:
        answer = KeptAnswer(response.status, _kept_headers(response), body)
    await _keep(claimed, answer)


async def _seal(
    request: web.Request,
    claimed: Claimed,
    capture: Capture,
    response: web.StreamResponse,
    complete: bool,
) -> None:
    """A streamed answer is written but for its end: keep what the client received."""
    if claimed.done:
        return
    if not complete:
        answer = _not_kept(request, "its answer from DashScope was cut short.")
    elif capture.size > claimed.limit:
        answer = _not_kept(request, _too_large(capture.size, claimed.limit))
    else:
        answer = KeptAnswer(response.status, _kept_headers(response), b"".join(capture.chunks))
    await _keep(claimed, answer)


async def _keep(claimed: Claimed, answer: KeptAnswer) -> None:
    claimed.done = True
    try:
        if not await claimed.store.keep(claimed.scope, claimed.token, answer, claimed.ttl):
            log.warning("an %s answer could not be kept (its claim is gone)", HEADER)
    except Exception:
        # The client has its answer; a repeat gets 409 until the lease ends, then 410.
        log.exception("keeping an %s answer failed", HEADER)


async def _release(claimed: Claimed) -> None:
    try:
        await claimed.store.release(claimed.scope, claimed.token)
    except Exception:
        log.exception("releasing an %s claim failed", HEADER)
