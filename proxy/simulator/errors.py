"""DashScope error values: the `(status, code, message)` triple and the canonical ones.

Pure data. Validation functions return an `ApiError`; handlers raise `SimHTTPError` carrying
one, and the app's error middleware renders it (JSON, or an SSE error frame for streams).
Messages are DashScope's own texts (its error-code table) where one is documented.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ApiError:
    """One DashScope error as it goes on the wire: HTTP status, `code`, `message`."""

    status: int
    code: str
    message: str


class SimHTTPError(Exception):
    """Raised by handlers; rendered in one place by the error middleware."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(f"{error.status} {error.code}: {error.message}")
        self.error = error


def invalid(message: str) -> ApiError:
    """400 `InvalidParameter` with a specific message."""
    return ApiError(400, "InvalidParameter", message)


INVALID_API_KEY = ApiError(401, "InvalidApiKey", "Invalid API-key provided.")
NO_API_KEY = ApiError(401, "InvalidApiKey", "No API-key provided.")
MODEL_NOT_EXIST = invalid("Model not exist.")
EMPTY_MODEL = ApiError(
    400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.'
)
EMPTY_INPUT = ApiError(
    400, "BadRequest.EmptyInput", "Required input parameter missing from request."
)
BAD_JSON = invalid("The request body is not a valid JSON object.")
TOO_LARGE = ApiError(413, "BadRequest.TooLarge", "Payload Too Large")
INVALID_URL = ApiError(400, "InvalidURL", "Invalid URL provided in your request.")
URL_ERROR = invalid("url error, please check url\uff01")
ASYNC_NOT_SUPPORTED = ApiError(
    403, "AccessDenied", "current user api does not support asynchronous calls"
)
SYNC_NOT_SUPPORTED = ApiError(
    403, "AccessDenied", "current user api does not support synchronous calls"
)
CANCEL_NOT_PENDING = ApiError(
    400,
    "UnsupportedOperation",
    "Failed to cancel the task, please confirm if the task is in PENDING status.",
)
NOT_FOUND = ApiError(404, "NotFound", "Not Found.")
POLICY_DENIED = ApiError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")

DATA_INSPECTION_OUTPUT = ApiError(
    400, "DataInspectionFailed", "Output data may contain inappropriate content."
)

# What `[sim:error=X]` produces, keyed by X.
FAULT_ERRORS: Mapping[str, ApiError] = MappingProxyType(
    {
        "400": invalid(
            "Required parameter(s) missing or invalid, please check the request parameters."
        ),
        "401": INVALID_API_KEY,
        "403": ApiError(403, "AccessDenied", "Access denied."),
        "404": ApiError(404, "InvalidParameter", "Model not exist."),
        "408": ApiError(408, "RequestTimeOut", "Request timed out, please try again later."),
        "413": TOO_LARGE,
        "429": ApiError(
            429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later."
        ),
        # DashScope also throttles a request rate that climbs too fast, below the per-minute
        # quota. Its exact code is not documented; this stand-in follows the Throttling.* names.
        "burst": ApiError(
            429, "Throttling.BurstRate", "Request rate increased too quickly, please slow down."
        ),
        "throttling": ApiError(429, "Throttling", "Requests throttling triggered."),
        "quota": ApiError(
            429,
            "Throttling.AllocationQuota",
            "Allocated quota exceeded, please increase your quota limit.",
        ),
        "inspection": ApiError(
            400, "DataInspectionFailed", "Input data may contain inappropriate content."
        ),
        "arrearage": ApiError(
            400,
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
        ),
        "500": ApiError(
            500,
            "InternalError",
            "An internal error has occured, please try again later or contact service support.",
        ),
        "502": ApiError(502, "BadGateway", "Bad gateway, please try again later."),
        "503": ApiError(
            503,
            "ServiceUnavailable",
            "The service is temporarily unavailable, please try again later.",
        ),
        "504": ApiError(504, "GatewayTimeout", "Gateway timeout, please try again later."),
    }
)
