"""The `Idempotency-Key` header and the request content it is bound to: pure checks and digests.

- `check_key`: the header's value, `1-255 printable ASCII characters`, else a 400
  (`InvalidParameter` / `invalid_request_error`) before anything runs.
- `scope_of`: where the key's entry is kept, a SHA-256 of the gateway key's name and the
  client's key (keys are per gateway key; no client text ends up in a key name).
- The content digest a repeat must match: SHA-256 over the route, the `X-DashScope-*`
  headers that change what DashScope does (SSE, async, workspace ...), and the body:
  the JSON body canonicalised (keys sorted, so key order does not matter), or for a
  multipart body its parts in order, name, content type and bytes (`MultipartDigest`):
  never the boundary, which the OpenAI SDK draws afresh for every retry.
- The errors of the flow, in both dialects (409, 410, 422).

No I/O; the flow is `proxy.core.idempotency`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from proxy.errors import GatewayError, invalid_parameter

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
MAX_KEY_LEN = 255
# Request headers that change what DashScope runs or answers for the same body.
CONTENT_HEADERS = (
    "X-DashScope-Async",
    "X-DashScope-SSE",
    "X-DashScope-WorkSpace",
    "X-DashScope-DataInspection",
    "X-DashScope-OssResourceResolve",
)
IN_PROGRESS_RETRY_AFTER = 1


def check_key(values: list[str]) -> str | None:
    """The request's `Idempotency-Key` (None when absent), or a 400 naming the rule."""
    if not values:
        return None
    value = values[0]
    if len(values) > 1 or not 1 <= len(value) <= MAX_KEY_LEN or not _printable_ascii(value):
        raise invalid_parameter(
            f"{HEADER} must be one header of 1-{MAX_KEY_LEN} printable ASCII characters.",
            "invalid_idempotency_key",
        )
    return value


def _printable_ascii(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def scope_of(key_name: str, idempotency_key: str) -> str:
    """The entry's name: a digest of the gateway key's name and the client's key."""
    return hashlib.sha256(f"{key_name}\0{idempotency_key}".encode()).hexdigest()


def _prefix(route: str, headers: Mapping[str, str]) -> Any:
    digest = hashlib.sha256()
    _field(digest, route.encode())
    for name in CONTENT_HEADERS:
        _field(digest, headers.get(name, "").strip().lower().encode())
    return digest


def _field(digest: Any, data: bytes) -> None:
    """Length-prefixed, so no two different sequences of fields hash alike."""
    digest.update(len(data).to_bytes(8, "big"))
    digest.update(data)


def canonical_json(obj: Any) -> bytes:
    """The JSON value with sorted keys and no spaces: the same for any key order. The
    stdlib encoder, so replicas with and without orjson agree byte for byte."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_fingerprint(route: str, headers: Mapping[str, str], body: Any) -> str:
    """The content digest of a JSON request."""
    digest = _prefix(route, headers)
    _field(digest, canonical_json(body))
    return str(digest.hexdigest())


class MultipartDigest:
    """The content digest of a multipart request, fed part by part as it is read."""

    def __init__(self, route: str, headers: Mapping[str, str]) -> None:
        self._digest = _prefix(route, headers)

    def part(self, name: str, content_type: str | None, data: bytes) -> None:
        _field(self._digest, name.encode())
        _field(self._digest, (content_type or "").encode())
        _field(self._digest, data)

    def hexdigest(self) -> str:
        return str(self._digest.hexdigest())


# ------------------------------------------------------------------------------ errors


def key_reused() -> GatewayError:
    return GatewayError(
        422,
        "IdempotencyKeyReused",
        f"This {HEADER} was already used with a different request. Send the same request "
        "to get its answer again, or a new key for a new request.",
        openai_type="invalid_request_error",
        openai_code="idempotency_key_reused",
    )


def in_progress() -> GatewayError:
    return GatewayError(
        409,
        "IdempotencyInProgress",
        f"The first request with this {HEADER} is still running; retry after a moment "
        "to get its answer.",
        openai_type="invalid_request_error",
        openai_code="idempotency_in_progress",
        retry_after=IN_PROGRESS_RETRY_AFTER,
    )


def answer_not_kept(why: str) -> GatewayError:
    """A request that ran (or may have run) whose answer cannot be replayed: it is never
    run again under this key, since that could generate (and bill) the images twice."""
    return GatewayError(
        410,
        "IdempotencyAnswerNotKept",
        f"The request with this {HEADER} was run, but {why} It is not run again under this "
        "key; send a new key to run it again.",
        openai_type="invalid_request_error",
        openai_code="idempotency_answer_not_kept",
    )
