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

from proxy.config.model import KeyConfig
from proxy.errors import GatewayError, access_denied, invalid_api_key, no_api_key


class KeyRing:
    """The configured keys, indexed by the SHA-256 of their secret.

    Built once per config (Runtime), so everything derivable from the config
    alone is computed here, not per request: the digests as bytes, and each
    key's allowlist answer per model (a bounded cache: the glob match runs once
    per distinct key and model).
    """

    _ALLOW_CACHE_MAX = 4096

    def __init__(self, keys: Iterable[KeyConfig]) -> None:
        # digest -> (key, digest): the stored digest kept as bytes for compare_digest.
        self._by_digest: dict[bytes, tuple[KeyConfig, bytes]] = {}
        self._by_name: dict[str, KeyConfig] = {}
        for k in keys:
            self._by_name[k.name] = k
            raw = bytes.fromhex(k.key_sha256)
            self._by_digest[raw] = (k, raw)
        self._allowed: dict[tuple[str, str], bool] = {}

    def authenticate(self, authorization: str | None) -> KeyConfig:
        """The key for an `Authorization: Bearer <key>` header; 401 `NoApiKey` when there is
        none, 401 `InvalidApiKey` when it is not a configured key."""
        if not authorization or not authorization.strip():
            raise no_api_key()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and not token:
            raise no_api_key()
        if scheme.lower() != "bearer" or len(token) > 512:
            raise invalid_api_key()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = self._by_digest.get(digest)
        # compare_digest keeps the final check constant-time even if the dict
        # implementation ever short-circuits on a partial match.
        if found is None or not hmac.compare_digest(found[1], digest):
            raise invalid_api_key()
        return found[0]

    def by_name(self, name: str) -> KeyConfig | None:
        """The configured key called `name` (metering looks up its limits per event)."""
        return self._by_name.get(name)

    def check_allowed(self, key: KeyConfig, model: str) -> None:
        """403 AccessDenied unless the key's allowlist admits the model (memoised per
        (key, model) for this config)."""
        ck = (key.name, model)
        ok = self._allowed.get(ck)
        if ok is None:
            ok = key.allows(model)
            if len(self._allowed) < self._ALLOW_CACHE_MAX:
                self._allowed[ck] = ok
        if not ok:
            raise model_denied(model)


def model_denied(model: str) -> GatewayError:
    return access_denied(f"This key is not allowed to use model {model!r}.")
