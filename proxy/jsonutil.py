"""JSON encode/decode: orjson when installed (several times faster on big bodies), else stdlib.

`dumps` returns UTF-8 bytes with non-ASCII kept raw, as DashScope and its SDK
send them; `loads` accepts bytes or str. `base64_string` turns image bytes into a
JSON string value for `dumps`: with the `fast` extra, pybase64's SIMD encoder (about
50x the stdlib's on a 3 MiB image) and an orjson `Fragment`, so the base64 text goes
into the answer as it is, never decoded to `str` nor scanned for escaping (base64
needs none).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised when the [fast] extra is absent
    orjson = None  # type: ignore[assignment]

try:
    import pybase64 as _base64
except ImportError:  # pragma: no cover - exercised when the [fast] extra is absent
    import base64 as _base64  # type: ignore[no-redef]

# orjson's already-serialised value (orjson >= 3.9.8), or None: then a str is returned.
_FRAGMENT = getattr(orjson, "Fragment", None)

JSONDecodeError = ValueError  # both json.JSONDecodeError and orjson.JSONDecodeError subclass it


def dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def base64_string(data: bytes) -> object:
    """`data` as a base64 JSON string value, for an answer `dumps` writes."""
    text = _base64.b64encode(data)
    if _FRAGMENT is not None:
        return _FRAGMENT(b'"' + text + b'"')
    return text.decode("ascii")


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    if orjson is not None:
        return orjson.loads(data)
    if isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data).decode("utf-8")
    return json.loads(data)
