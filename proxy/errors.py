"""The gateway's error tree and the one place errors become HTTP responses.

Every error the gateway itself raises is a `GatewayError` carrying both
dialects: DashScope's `{"request_id", "code", "message"}` (the only shape the
DashScope SDKs can read, used under `/api/v1`) and OpenAI's
`{"error": {"message", "type", "code"}}` (used under `/v1` and `/aliyun/v1`,
the shape the OpenAI SDK maps to its exception classes).

Handlers raise; `render_error` is called by the request pipeline only, and only
before a response has started. Nothing here knows about sockets.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from proxy.jsonutil import dumps


class Dialect(enum.Enum):
    DASHSCOPE = "dashscope"
    OPENAI = "openai"


# Route names are `<front>.<what>` for the OpenAI-dialect front ends; the native
# routes keep DashScope's endpoint names (they are metric labels).
_OPENAI_FRONTS = ("openai.", "aliyun.")


def dialect_for(route: str, path: str) -> Dialect:
    """The dialect of the front end that owns `route`. A request that matched no route
    (404, 405) is guessed from its path: `/v1/...` and `/aliyun/...` speak OpenAI,
    everything else DashScope."""
    if route.startswith(_OPENAI_FRONTS):
        return Dialect.OPENAI
    if route != "unmatched":
        return Dialect.DASHSCOPE
    if path.startswith("/v1/") or path == "/v1" or path.startswith("/aliyun/"):
        return Dialect.OPENAI
    return Dialect.DASHSCOPE


# OpenAI error `type` by HTTP status, as the OpenAI API uses them.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_type_for(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass(slots=True)
class GatewayError(Exception):
    """An error answered to the client. `code` is DashScope's code."""

    status: int
    code: str
    message: str
    openai_type: str | None = None
    openai_code: str | None = None
    retry_after: int | None = None
    allow: str | None = None  # the `Allow` header of a 405 (RFC 9110)
    both_dialects: bool = False  # a body both SDKs read (unknown paths: dialect unknown)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def openai_body(self) -> dict[str, object]:
        etype = self.openai_type or openai_type_for(self.status)
        return {
            "error": {"message": self.message, "type": etype, "code": self.openai_code or self.code}
        }

    def dashscope_body(self, request_id: str) -> dict[str, object]:
        return {"request_id": request_id, "code": self.code, "message": self.message}


# ------------------------------------------------------------------ the common errors


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401, "InvalidApiKey", "Invalid API-key provided.", openai_code="invalid_api_key"
    )


def no_api_key() -> GatewayError:
    """No bearer key at all: DashScope's own words, so the SDKs show the real cause."""
    return GatewayError(
        401,
        "NoApiKey",
        "No API-key provided.",
        openai_type="invalid_request_error",
        openai_code="missing_api_key",
    )


def access_denied(message: str = "Access denied.") -> GatewayError:
    return GatewayError(403, "AccessDenied", message, openai_code="model_not_allowed")


def invalid_parameter(message: str, openai_code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, "InvalidParameter", message, openai_code=openai_code)


def not_found(message: str = "Not found.") -> GatewayError:
    return GatewayError(404, "NotFound", message, openai_code="not_found")


def method_not_allowed(method: str) -> GatewayError:
    return GatewayError(
        405,
        "MethodNotAllowed",
        f"Method {method} is not allowed on this path.",
        openai_code="method_not_allowed",
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "BadRequest.TooLarge",
        f"Request body is larger than the gateway's limit of {limit} bytes.",
        openai_code="request_too_large",
    )


def upstream_unavailable(detail: str) -> GatewayError:
    return GatewayError(
        502,
        "BadGateway",
        f"DashScope could not be reached: {detail}.",
        openai_type="server_error",
        openai_code="upstream_unavailable",
    )


def upstream_timeout() -> GatewayError:
    return GatewayError(
        504,
        "GatewayTimeout",
        "DashScope did not answer in time.",
        openai_type="server_error",
        openai_code="upstream_timeout",
    )


def no_upstream(model: str) -> GatewayError:
    return GatewayError(
        400,
        "InvalidParameter",
        f"Model {model!r} is not served by any configured upstream.",
        openai_code="model_not_found",
    )


# DashScope's throttling answers carry no Retry-After; its per-minute quotas and the
# burst throttle ("request rate increased too quickly") both clear within seconds.
THROTTLE_RETRY_AFTER = 1


def is_throttling(code: str | None) -> bool:
    """Pure: is this one of DashScope's `Throttling*` codes (any of them, including the
    burst throttle)? They all reach the client as 429 with `Retry-After`."""
    return bool(code) and str(code).startswith("Throttling")


def retry_after_of(header: str | None) -> int:
    """Pure: DashScope's `Retry-After` (whole seconds) if it sent one, else our default."""
    if header and header.strip().isdigit():
        return max(1, int(header.strip()))
    return THROTTLE_RETRY_AFTER


def upstream_key_rejected(upstreams: Iterable[str]) -> GatewayError:
    """DashScope refused the gateway's own key on every eligible upstream: the operator's
    problem, so never DashScope's `InvalidApiKey` that a team would read as its own key."""
    names = ", ".join(repr(u) for u in upstreams)
    return GatewayError(
        502,
        "UpstreamAuthenticationFailed",
        f"DashScope rejected the gateway's API key for upstream {names}. Your gateway key was "
        "accepted; tell the gateway operator (dashscope-proxy check-config --probe).",
        openai_type="api_error",
        openai_code="upstream_authentication_failed",
    )


def unknown_model(model: str) -> GatewayError:
    """A name the gateway does not know as a DashScope model (`gpt-image-1`, `dall-e-3`),
    refused on the OpenAI front end before any upstream call."""
    return GatewayError(
        400,
        "InvalidParameter",
        f"Model {model!r} is not a DashScope image model known to this gateway. Use a "
        "DashScope model (for example qwen-image-2.0), or map this name to one in the "
        "gateway config's models: section.",
        openai_code="model_not_found",
    )


def internal_error() -> GatewayError:
    return GatewayError(
        500,
        "InternalError",
        "An internal error has occured, please try again later or contact service support.",
        openai_type="server_error",
        openai_code="internal_error",
    )


def prompt_too_long(length: int, limit: int) -> GatewayError:
    return GatewayError(
        400,
        "InvalidParameter",
        f"The prompt is too long: {length} characters, and the gateway accepts at most "
        f"{limit} (DashScope's image models read at most a few thousand).",
        openai_code="prompt_too_long",
    )


ONLY_ALIYUN = "only aliyun channel is supported on /aliyun/v1/images/generations"


def only_aliyun() -> GatewayError:
    """The hosted platform's exact envelope for a model `/aliyun/v1` cannot route to DashScope."""
    return GatewayError(
        400,
        "InvalidParameter",
        ONLY_ALIYUN,
        openai_type="invalid_request_error",
        openai_code="invalid_request",
    )


def fetch_error(index: int, total: int, reason: str) -> GatewayError:
    return GatewayError(
        502,
        "ImageFetchFailed",
        f"Could not fetch generated image data[{index}] ({index + 1} of {total}) for "
        f"b64_json: {reason}. DashScope generated (and billed) it; retry, or ask for "
        "response_format=url.",
        openai_type="server_error",
        openai_code="image_fetch_failed",
    )


def state_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "ServiceUnavailable",
        "Task state is temporarily unavailable (the gateway's shared state store "
        "cannot be reached); please retry shortly.",
        openai_type="server_error",
        openai_code="state_unavailable",
        retry_after=2,
    )


def empty_body() -> GatewayError:
    return GatewayError(
        400,
        "BadRequest.EmptyInput",
        "Required request body is missing.",
        openai_code="invalid_request",
    )


def missing_model() -> GatewayError:
    """DashScope's answer for a request without `model`."""
    return GatewayError(
        400,
        "BadRequest.EmptyModel",
        'Required parameter "model" missing from request.',
        openai_code="missing_model",
    )


def cancel_refused() -> GatewayError:
    """DashScope's answer for cancelling a task that is not PENDING (or not the caller's:
    the same words, so an id reveals nothing)."""
    return GatewayError(
        400,
        "UnsupportedOperation",
        "Failed to cancel the task, please confirm if the task is in PENDING status.",
    )


def upstream_bad_answer(message: str, code: str = "upstream_bad_answer") -> GatewayError:
    """DashScope answered something the gateway cannot use (not JSON, no task id, no image)."""
    return GatewayError(502, "BadGateway", message, openai_type="server_error", openai_code=code)


def from_http_status(status: int, reason: str) -> GatewayError:
    """An error aiohttp raised itself (a status with no better mapping)."""
    return GatewayError(status, "InvalidParameter", reason)


def upstream_unavailable_now(retry_after: float, message: str) -> GatewayError:
    """503 with Retry-After: every upstream is full or its circuit open; retry shortly."""
    return GatewayError(
        503,
        "ServiceUnavailable",
        message,
        openai_type="server_error",
        openai_code="upstream_unavailable",
        retry_after=max(1, math.ceil(retry_after)),
    )


# What a path that matched no route probably meant: DashScope's native paths, and the
# OpenAI images API's. A client that sent one with the wrong prefix (or none, or twice)
# learns the base URL it should use.
_NATIVE_TAILS = ("/services/aigc/", "/tasks", "/uploads")
_OPENAI_TAILS = ("/images/generations", "/images/edits", "/models")


def suggested_base(path: str) -> str | None:
    """Pure: the base URL a mistyped path was probably meant for, or None.

    `/v1/services/aigc/...` (the DashScope SDK pointed at `/v1`) -> `/api/v1`;
    `/services/aigc/...` (no prefix) -> `/api/v1`; `/api/v1/images/generations` (the
    OpenAI SDK pointed at `/api/v1`) -> `/v1`; `/v1/v1/images/...` -> `/v1`.
    """
    for tail in _NATIVE_TAILS:
        i = path.find(tail)
        if i >= 0 and path[:i] != "/api/v1":
            return "/api/v1"
    for tail in _OPENAI_TAILS:
        i = path.find(tail)
        if i >= 0 and path[:i] != "/v1":
            return "/v1"
    return None


def unknown_path(path: str) -> GatewayError:
    """404 for a path no front end serves, in a body both SDKs can read, with a hint."""
    base = suggested_base(path)
    hint = ""
    if base == "/api/v1":
        hint = (
            " This looks like a DashScope API path: the DashScope SDK's base URL is "
            "http(s)://<gateway>/api/v1 (dashscope.base_http_api_url)."
        )
    elif base == "/v1":
        hint = (
            " This looks like an OpenAI images API path: the OpenAI SDK's base_url is "
            "http(s)://<gateway>/v1."
        )
    return GatewayError(
        404,
        "NotFound",
        "No such endpoint." + hint,
        openai_type="invalid_request_error",
        openai_code="not_found",
        both_dialects=True,
    )


def method_not_allowed_on(method: str, allowed: Iterable[str]) -> GatewayError:
    """405 with the `Allow` header RFC 9110 requires."""
    err = method_not_allowed(method)
    err.allow = ", ".join(sorted(set(allowed)))
    return err


def render_error(err: GatewayError, dialect: Dialect, request_id: str) -> web.Response:
    """The one renderer. Always JSON; `Retry-After` on throttling."""
    if err.both_dialects:
        body = {**err.dashscope_body(request_id), **err.openai_body()}
    elif dialect is Dialect.OPENAI:
        body = err.openai_body()
    else:
        body = err.dashscope_body(request_id)
    headers = {"x-request-id": request_id}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    if err.allow is not None:
        headers["Allow"] = err.allow
    return web.Response(
        status=err.status, body=dumps(body), content_type="application/json", headers=headers
    )
