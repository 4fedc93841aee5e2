"""DashScope errors -> the OpenAI error envelope, and the images API's own parameter errors.

The OpenAI SDK picks its exception class from the HTTP status and reads
`{"error": {"message", "type", "code"}}`: so a DashScope 401 must stay a 401
with `authentication_error`, a 429 a 429 with `rate_limit_error` (and its
`Retry-After`), and a content-inspection refusal a 400 whose message says what
happened and what to do. DashScope's own code is kept as the OpenAI `code`
(users look it up in DashScope's docs), except for content inspection, which
uses OpenAI's `content_policy_violation`.

Pure: no I/O. The request pipeline renders these (`errors.render_error`).
"""

from __future__ import annotations

from typing import Any

from proxy.errors import THROTTLE_RETRY_AFTER, GatewayError, is_throttling, openai_type_for
from proxy.state.tasks import TaskRecord

IMAGE_REQUEST = "invalid_image_request"  # the OpenAI `code` of the relay's parameter errors


def bad_request(message: str) -> GatewayError:
    """A 400 on an images request, as the OpenAI relay words it."""
    return GatewayError(
        400,
        "InvalidParameter",
        message,
        openai_type="invalid_request_error",
        openai_code=IMAGE_REQUEST,
    )


_CONTENT_CODES = frozenset(
    {"DataInspectionFailed", "InvalidParameter.DataInspection", "IPInfringementSuspect"}
)


def status_for_code(code: str) -> int:
    """The HTTP status DashScope uses for `code` (for failures reported inside a task)."""
    for prefix, status in (
        ("InvalidApiKey", 401),
        ("AccessDenied", 403),
        ("Throttling", 429),
        ("InternalError", 500),
        ("RequestTimeOut", 408),
    ):
        if code.startswith(prefix):
            return status
    if code in _CONTENT_CODES or code.startswith(
        ("InvalidParameter", "BadRequest", "InvalidURL", "Arrearage", "UnsupportedOperation")
    ):
        return 400
    return 500


def upstream_error(
    status: int, code: str | None, message: str | None, retry_after: int | None = None
) -> GatewayError:
    """A DashScope error, in the OpenAI envelope the OpenAI SDK maps to its exception classes."""
    code = code or str(status)
    message = message or "DashScope returned an error."
    if code in _CONTENT_CODES:
        return GatewayError(
            400,
            code,
            f"The request was rejected by DashScope's content "
            f"inspection ({code}: {message}) Change the prompt or the input "
            "images and try again.",
            openai_type="invalid_request_error",
            openai_code="content_policy_violation",
        )
    if is_throttling(code) or status == 429:
        status = 429
        retry_after = retry_after or THROTTLE_RETRY_AFTER
    if status == 401:
        message = (
            f"DashScope rejected the gateway's upstream credentials ({code}: {message}). "
            "Your gateway key was accepted; tell the gateway operator."
        )
    etype = openai_type_for(status)
    return GatewayError(
        status,
        code,
        message,
        openai_type=etype,
        openai_code=code,
        retry_after=retry_after if status == 429 else None,
    )


def error_fields(body: Any) -> tuple[str | None, str | None]:
    """`(code, message)` of a DashScope error body or failed task (inside `output` or top level)."""
    if not isinstance(body, dict):
        return None, None
    output = body.get("output")
    for where in (body, output if isinstance(output, dict) else {}):
        code = where.get("code")
        if isinstance(code, str) and code:
            message = where.get("message")
            return code, message if isinstance(message, str) else None
    return None, None


def task_error(body: Any) -> GatewayError:
    """A FAILED (or CANCELED) task's error with the status DashScope uses for its code."""
    code, message = error_fields(body)
    if code is None:
        output = body.get("output") if isinstance(body, dict) else None
        status = output.get("task_status") if isinstance(output, dict) else None
        return GatewayError(
            500,
            "TaskFailed",
            f"The DashScope task ended {status or 'FAILED'}.",
            openai_type="server_error",
            openai_code="task_failed",
        )
    return upstream_error(status_for_code(code), code, message)


def still_running(record: TaskRecord, waited: float) -> GatewayError:
    return GatewayError(
        504,
        "GatewayTimeout",
        f"DashScope has not finished task {record.task_id} within {waited:g} s. It is still "
        f"running and will be billed; fetch its result with GET /v1/images/generations/"
        f"{record.task_id} using the same key.",
        openai_type="server_error",
        openai_code="generation_timeout",
    )


def task_unknown(record: TaskRecord) -> GatewayError:
    return GatewayError(
        502,
        "BadGateway",
        f"DashScope no longer knows task {record.task_id}.",
        openai_type="server_error",
        openai_code="task_unknown",
    )


def task_not_found(task_id: str) -> GatewayError:
    return GatewayError(
        404,
        "NotFound",
        f"No image generation task {task_id} found for this key.",
        openai_code="task_not_found",
    )
