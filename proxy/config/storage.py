"""Parsing `storage:`: durable copies of delivered images, every problem with its location.

    storage:
      backend: local                  # local | s3
      path: ./dashscope-proxy-images  # local
      signing_key: ${IMAGE_LINK_SECRET}
      link_ttl_seconds: 604800
      retention_days: 30
      max_image_bytes: 33554432

`s3` needs a `bucket`; signed gateway links need a `signing_key` of at least 16
characters, unless `public_base_url` makes links plain URLs of a CDN or public bucket.
Pure, like `proxy.config.parse`; the storing itself is `proxy.storage`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.config.extras import missing_extra
from proxy.config.model import StorageConfig
from proxy.config.sections import Section

FIELDS = set(StorageConfig.__dataclass_fields__)
BACKENDS = ("local", "s3")
MIN_SIGNING_KEY = 16


def parse_storage(s: Section) -> StorageConfig:
    """`storage:` (the caller parses it only when the section is present)."""
    d = StorageConfig()
    backend = s.text("backend", d.backend)
    if backend not in BACKENDS:
        s.p.add(s.loc("backend"), f"must be local or s3, got {backend!r}")
    if missing := missing_extra(backend):
        s.p.add(s.loc("backend"), missing)
    path = s.text("path", d.path)
    if backend == "local" and not path:
        s.p.add(s.loc("path"), "must be a directory path")
    bucket = s.text("bucket")
    if backend == "s3" and not bucket:
        s.p.add(s.loc("bucket"), "is required with backend: s3")
    endpoint = s.text("endpoint_url")
    if endpoint is not None and not _http_url(endpoint):
        s.p.add(s.loc("endpoint_url"), f"must be an http(s) URL, got {endpoint!r}")
    public = s.text("public_base_url")
    if public is not None and not _http_url(public):
        s.p.add(s.loc("public_base_url"), f"must be an http(s) URL, got {public!r}")
    signing_key = s.text("signing_key", "")
    if not public and not signing_key:
        s.p.add(
            s.loc("signing_key"),
            "is required (the HMAC key of the gateway's image links), unless "
            "public_base_url is set",
        )
    elif signing_key and len(signing_key) < MIN_SIGNING_KEY:
        s.p.add(s.loc("signing_key"), f"must be at least {MIN_SIGNING_KEY} characters")
    access_key = s.text("access_key_id")
    secret_key = s.text("secret_access_key")
    if (access_key is None) != (secret_key is None):
        s.p.add(s.where, "set both access_key_id and secret_access_key, or neither")
    return StorageConfig(
        backend=backend,
        path=path,
        bucket=bucket,
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=s.text("region"),
        access_key_id=access_key,
        secret_access_key=secret_key,
        prefix=s.text("prefix", d.prefix),
        signing_key=signing_key,
        public_base_url=public.rstrip("/") if public else None,
        link_ttl_seconds=s.number("link_ttl_seconds", d.link_ttl_seconds, 1),
        retention_days=s.number("retention_days", d.retention_days, 0.00001),
        max_image_bytes=s.integer("max_image_bytes", d.max_image_bytes, 1),
    )


def _http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)
