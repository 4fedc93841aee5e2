"""JSON encode/decode: orjson when installed (several times faster on big bodies), else stdlib.

`dumps` returns UTF-8 bytes with non-ASCII kept raw, as DashScope and its SDK
send them; `loads` accepts bytes or str.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised when the [fast] extra is absent
    orjson = None  # type: ignore[assignment]

JSONDecodeError = ValueError  # both json.JSONDecodeError and orjson.JSONDecodeError subclass it


def dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    if orjson is not None:
        return orjson.loads(data)
    if isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data).decode("utf-8")
    return json.loads(data)
