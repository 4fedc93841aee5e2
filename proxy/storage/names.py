"""Object names: what a stored image is called, derived from the image itself. Pure.

A name is 48 hex digits and an extension (`3f2a...9c.png`):

- an image DashScope serves at a URL is named by an HMAC of that URL without its query
  string (the query is the expiring signature, which changes on every poll; the path
  names the image), keyed by `storage.signing_key`, so a repeat poll of the same task
  finds the same object and nobody can tell from a name which DashScope URL it was;
- an image sent inline (base64 or a `data:` URL) is named by the SHA-256 of its bytes.

Names hold no secret and no prompt, and `NAME` admits nothing else, so
`GET /images/{name}` can never reach outside the store (no `/`, no `..`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

NAME = re.compile(r"^[0-9a-f]{48}\.(png|jpg|webp|gif)$")
_DIGITS = 48
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
}
_EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp", "gif": "gif"}
_TYPES = {v: k for k, v in CONTENT_TYPES.items()}
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)
# Raw base64 is recognised only when long enough to be an image (a short string of
# base64 letters is far more likely a word, an id or a prompt).
_RAW_MIN = 64
_B64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")


@dataclass(frozen=True, slots=True)
class Inline:
    """An image that came inline: its bytes and its name."""

    name: str
    data: bytes
    content_type: str


def is_name(name: str) -> bool:
    return NAME.match(name) is not None


def content_type_of(name: str) -> str:
    return CONTENT_TYPES.get(name.rpartition(".")[2], "application/octet-stream")


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def url_name(secret: str, url: str) -> str:
    """The name of the image at `url` (its query string ignored)."""
    parts = urlsplit(url)
    stable = f"{parts.scheme}://{parts.netloc.lower()}{parts.path}"
    digest = hmac.new(
        b"dashscope-proxy image\n" + secret.encode(), stable.encode(), hashlib.sha256
    ).hexdigest()
    last = parts.path.rpartition("/")[2]
    ext = _EXTENSIONS.get(last.rpartition(".")[2].lower(), "png") if "." in last else "png"
    return f"{digest[:_DIGITS]}.{ext}"


def inline_image(ref: str, max_bytes: int) -> Inline | None:
    """The image a `data:` URL or raw base64 string holds, or None when `ref` is not one
    (or is larger than `max_bytes`, or not valid base64)."""
    match = _DATA_URL.match(ref)
    if match:
        payload = ref[match.end() :]
        declared = (match.group(1) or "").lower()
    elif len(ref) >= _RAW_MIN and _B64.match(ref[:4096]):
        payload, declared = ref, ""
    else:
        return None
    if len(payload) * 3 // 4 > max_bytes + 3:
        return None
    try:
        data = base64.b64decode(payload, validate=not payload.count("\n"))
    except (binascii.Error, ValueError):
        return None
    if not data or len(data) > max_bytes:
        return None
    ext = _TYPES.get(declared) or sniff_extension(data)
    if ext is None:
        return None
    digest = hashlib.sha256(data).hexdigest()
    return Inline(f"{digest[:_DIGITS]}.{ext}", data, CONTENT_TYPES[ext])


def sniff_extension(head: bytes) -> str | None:
    """The image format the first bytes show, or None when they are not an image."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None
