"""The gateway's image links: signed, expiring URLs of `GET /images/{name}`. Pure.

A link is `<scheme>://<host the client used>/images/<name>?expires=<unix>&signature=<hex>`
where the signature is HMAC-SHA256 over the name and the expiry, keyed by
`storage.signing_key`, compared in constant time. With `storage.public_base_url` a link
is that URL + `/` + the name instead (a CDN or a public bucket serves it, unsigned).

Behind a reverse proxy the client's scheme and host are `X-Forwarded-Proto` /
`X-Forwarded-Host` (their first value); a host value that is not a plain host[:port]
is ignored, so a header cannot put anything but a host into an answer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from proxy.config.model import StorageConfig

_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def signature(secret: str, name: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


def verify(secret: str, name: str, expires: str, sig: str, now: float) -> bool:
    """Whether `sig` signs `name` until `expires`, and that moment has not passed."""
    if not secret or not expires.isdigit() or len(expires) > 12 or not _HEX.match(sig):
        return False
    good = hmac.compare_digest(signature(secret, name, int(expires)).encode(), sig.encode())
    return good and int(expires) >= now


def origin(scheme: str, host: str, headers: Mapping[str, str]) -> str:
    """`scheme://host` as the client addressed the gateway."""
    proto = headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    fwd_host = headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    if proto in ("http", "https"):
        scheme = proto
    if fwd_host and _HOST.match(fwd_host):
        host = fwd_host
    elif not _HOST.match(host):
        host = "localhost"
    return f"{scheme}://{host}"


def link(config: StorageConfig, base: str, name: str, now: float) -> str:
    """The link handed out for `name`: public, or signed for `link_ttl_seconds` from `now`."""
    if config.public_base_url:
        return f"{config.public_base_url}/{name}"
    expires = int(now + config.link_ttl_seconds)
    sig = signature(config.signing_key, name, expires)
    return f"{base}/images/{name}?expires={expires}&signature={sig}"
