"""Bearer key -> key identity, and per-key model allowlists.

The presented key is hashed once with SHA-256 and looked up by digest, then
compared with `hmac.compare_digest`: the lookup's timing depends only on the
digest, never on how much of a secret matched, and the config need only hold
digests (`key_sha256`). Secrets are never stored beyond this function's frame.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .config import KeyConfig
from .errors import GatewayError, access_denied, invalid_api_key


class KeyRing:
    """The configured keys, indexed by the SHA-256 of their secret."""

    def __init__(self, keys: Iterable[KeyConfig]) -> None:
        self._by_digest = {bytes.fromhex(k.key_sha256): k for k in keys}

    def authenticate(self, authorization: str | None) -> KeyConfig:
        """The key for an `Authorization: Bearer <key>` header, or 401 InvalidApiKey."""
        if not authorization:
            raise invalid_api_key()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise invalid_api_key()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        key = self._by_digest.get(digest)
        # compare_digest keeps the final check constant-time even if the dict
        # implementation ever short-circuits on a partial match.
        if key is None or not hmac.compare_digest(bytes.fromhex(key.key_sha256), digest):
            raise invalid_api_key()
        return key


def check_model_allowed(key: KeyConfig, model: str) -> None:
    """403 AccessDenied unless the key's allowlist admits the model."""
    if not key.allows(model):
        raise model_denied(model)


def model_denied(model: str) -> GatewayError:
    return access_denied(f"This key is not allowed to use model {model!r}.")
