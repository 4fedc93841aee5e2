"""Signed, expiring URLs for result images and signed upload policies, OSS style.

A result image is named `<seed>-<index>-<token>`; the image handler redraws it from the seed
and index, so no image bytes are stored per result. The signature (HMAC-SHA256 with a secret
made per app) covers the name and the expiry, so a URL cannot be forged or extended.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from urllib.parse import quote

ACCESS_KEY_ID = "LTAIsimulatorKey"  # looks like an OSS AccessKeyId; carries no secret


class Signer:
    """HMAC signatures with one secret per simulator app."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def sign(self, *parts: str) -> str:
        mac = hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, signature: str, *parts: str) -> bool:
        return hmac.compare_digest(signature.encode(), self.sign(*parts).encode())


def image_name(seed: int, index: int) -> str:
    """A fresh result-image name; the random token makes every result URL unique."""
    return f"{seed}-{index}-{secrets.token_hex(8)}"


def parse_image_name(name: str) -> tuple[int, int] | None:
    """(seed, index) of an image name, or None if it is not one of ours."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


def signed_image_url(signer: Signer, origin: str, name: str, expires: int) -> str:
    """`<origin>/_sim/images/<name>.png?Expires=..&OSSAccessKeyId=..&Signature=..`."""
    signature = signer.sign("image", name, str(expires))
    return (
        f"{origin}/_sim/images/{name}.png?Expires={expires}"
        f"&OSSAccessKeyId={ACCESS_KEY_ID}&Signature={quote(signature, safe='')}"
    )


def check_image_signature(signer: Signer, name: str, expires: str, signature: str) -> bool:
    return signer.verify(signature, "image", name, expires)


def make_policy(signer: Signer, upload_dir: str, expires_at: int) -> tuple[str, str]:
    """An upload policy (base64 JSON, like OSS) for keys under `upload_dir`, and its signature."""
    document = {"expiration": expires_at, "conditions": [["starts-with", "$key", upload_dir]]}
    policy = base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()
    return policy, signer.sign("policy", policy)


def check_policy(signer: Signer, policy: str, signature: str, key: str, now: float) -> bool:
    """Whether an upload of `key` is allowed by this signed, unexpired policy."""
    if not signer.verify(signature, "policy", policy):
        return False
    try:
        document = json.loads(base64.b64decode(policy))
        upload_dir = document["conditions"][0][2]
        expiration = float(document["expiration"])
    except (ValueError, KeyError, IndexError, TypeError):
        return False
    return (
        now <= expiration
        and isinstance(upload_dir, str)
        and key.startswith(upload_dir + "/")
        and ".." not in key
    )
