"""Input images of an OpenAI request: URLs, data URLs, raw base64, uploaded bytes.

Pure: every form the OpenAI SDK or a form upload sends becomes a URL or a
`data:` URL DashScope accepts (the MIME type sniffed from the bytes), or a
400 naming the field.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from proxy.fronts.openai.errors import bad_request

# Enough input images for every DashScope edit model (at most 4), with room.
MAX_INPUT_IMAGES = 16

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_mime(data: bytes) -> str | None:
    """The image type of `data` from its first bytes (PNG, JPEG, WEBP, BMP, GIF), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return None


def data_url(data: bytes, mime: str | None, where: str) -> str:
    """Image bytes as the `data:` URL DashScope accepts for input images."""
    sniffed = sniff_mime(data)
    if sniffed is None:
        raise bad_request(f"{where} is not a PNG, JPEG, WEBP, BMP or GIF image.")
    if mime is None or not mime.startswith("image/"):
        mime = sniffed
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def normalize_images(value: Any) -> tuple[str, ...]:
    """The `image` field of a generations body: a URL, a data URL, bare base64, an object
    (`{"url"}`, `{"image_url": ...}`, `{"b64_json"}`) or a list of those."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_INPUT_IMAGES:
        raise bad_request(f"image accepts at most {MAX_INPUT_IMAGES} images.")
    return tuple(_one_image(item, f"image[{i}]") for i, item in enumerate(items))


def _one_image(item: Any, where: str) -> str:
    if isinstance(item, dict):
        inner = item.get("url") or item.get("image_url") or item.get("b64_json")
        if isinstance(inner, dict):
            inner = inner.get("url")
        item = inner
    if not isinstance(item, str) or not item.strip():
        raise bad_request(f"{where} must be an image URL, a data URL or base64 image data.")
    text: str = item.strip()
    if text.startswith(("https://", "http://")):
        return text  # DashScope fetches URLs itself
    if text.startswith("data:"):
        head, sep, payload = text.partition(",")
        if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
            raise bad_request(f"{where} must be a data URL like data:image/png;base64,....")
        return data_url(_b64(payload, where), head[5:-7], where)
    return data_url(_b64(text, where), None, where)


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            f"{where} must be an image URL, a data URL or base64 image data."
        ) from None
