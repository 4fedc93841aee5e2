"""Pure parsers of single request fields: sizes, typed parameters, image references and the
user message of `input.messages`.

Each returns the parsed value or the `ApiError` DashScope answers for it; `models.py` strings
them together into one request check.
"""

from __future__ import annotations

import re
from typing import Any

from .catalogue import ModelSpec, SizeRule
from .errors import ApiError, invalid

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*\*\s*(\d{1,5})\s*$")


def is_image_ref(value: str) -> bool:
    """An input image DashScope can resolve: http(s) URL, `data:` URI or `oss://` key."""
    if value.startswith(("http://", "https://")):
        return len(value) > len("https://")
    if value.startswith("data:"):
        head, sep, _ = value.partition(",")
        return bool(sep) and head.startswith("data:image/") and head.endswith(";base64")
    return value.startswith("oss://") and len(value) > len("oss://")


def parse_size(text: str) -> tuple[int, int] | None:
    """`"1024*1024"` -> (1024, 1024); anything else (`1024x1024`, `1024×1024`) -> None."""
    match = _SIZE_RE.match(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def check_size(rule: SizeRule, width: int, height: int) -> str | None:
    """Why `width*height` breaks `rule`, or None when it is allowed."""
    if rule.kind == "any":
        return None
    if width <= 0 or height <= 0:
        return "width and height must be positive"
    if (width, height) in rule.fixed:
        return None
    if rule.kind == "fixed":
        return "allowed sizes are " + ", ".join(f"{w}*{h}" for w, h in rule.fixed)
    if rule.kind == "sides" and not (
        rule.low <= width <= rule.high and rule.low <= height <= rule.high
    ):
        return f"each side must be between {rule.low} and {rule.high} pixels"
    if rule.kind == "pixels" and not rule.low <= width * height <= rule.high:
        return f"total pixels must be between {rule.low} and {rule.high}"
    if rule.max_aspect and max(width, height) / min(width, height) > rule.max_aspect:
        return "the aspect ratio must be between 1:4 and 4:1"
    if width % rule.multiple or height % rule.multiple:
        return f"width and height must be multiples of {rule.multiple}"
    return None


def resolve_size(
    spec: ModelSpec, rule: SizeRule, value: object, default: tuple[int, int]
) -> tuple[int, int] | ApiError:
    if value is None:
        return default
    if not isinstance(value, str):
        return invalid("The size parameter must be a string like 1024*1024.")
    for label, dims in rule.presets:
        if value.strip().upper() == label:
            return dims
    dims_or_none = parse_size(value)
    if dims_or_none is None:
        return invalid(f"The size {value!r} is invalid; use width*height, e.g. 1024*1024.")
    reason = check_size(rule, *dims_or_none)
    if reason is not None:
        return invalid(f"The size {value} is not supported by {spec.name}: {reason}.")
    return dims_or_none


def opt_int_param(params: dict[str, Any], key: str) -> int | None | ApiError:
    value = params.get(key)
    if value is None:
        return None
    # bool is an int in Python, not in DashScope's schema.
    if isinstance(value, bool) or not isinstance(value, int):
        return invalid(f"The parameter {key} must be an integer.")
    return value


def int_param(params: dict[str, Any], key: str, default: int) -> int | ApiError:
    value = opt_int_param(params, key)
    return default if value is None else value


def bool_param(params: dict[str, Any], key: str, default: bool) -> bool | ApiError:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        return invalid(f"The parameter {key} must be a boolean.")
    return value


def choice_param(params: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str | ApiError:
    """An optional string parameter restricted to `allowed` ("" when absent)."""
    value = params.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or value not in allowed:
        return invalid(f"The parameter {key} must be one of {', '.join(allowed)}.")
    return value


def text_param(source: dict[str, Any], key: str, limit: int) -> str | ApiError:
    value = source.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        return invalid(f"The parameter {key} must be a string.")
    return value[:limit]


def parse_messages(inp: dict[str, Any]) -> tuple[list[str], list[str]] | ApiError:
    """The texts and images of the single user message of `input.messages`.

    Items may come in any order: DashScope's examples put images first for some models and
    last for others, and the order carries no meaning for a single prompt.
    """
    messages = inp.get("messages")
    if not isinstance(messages, list) or not messages:
        return invalid("The input messages must be a non-empty list.")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return invalid("Each message must be an object with a role.")
    if len(messages) != 1 or messages[0]["role"] != "user":
        return invalid("Only a single message with role user is supported.")
    content = messages[0].get("content")
    if isinstance(content, str):
        content = [{"text": content}]
    if not isinstance(content, list) or not content:
        return invalid("The message content must be a non-empty list.")
    texts: list[str] = []
    images: list[str] = []
    for item in content:
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            images.append(item["image"])
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            return invalid('Each content item must be {"text": str} or {"image": str}.')
    return texts, images


def count_check(what: str, count: int, low: int, high: int) -> ApiError | None:
    if low <= count <= high:
        return None
    if low == high:
        return invalid(f"The number of {what} must be {low}.")
    return invalid(f"The number of {what} must be between {low} and {high}.")
