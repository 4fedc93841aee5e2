"""The storage metrics, on the gateway's registry: what was stored, how much, what failed.

- `dashscope_proxy_stored_images_total{backend}`: images written to the store (an image
  already kept, polled again, is not written again and not counted again);
- `dashscope_proxy_stored_bytes_total{backend}`: their bytes;
- `dashscope_proxy_storage_errors_total{backend,reason}`: images delivered with
  DashScope's own URL because fetching or storing failed (`reason`: `host`, `status`,
  `too_large`, `timeout`, `connection`, `empty`, `not_image`, `invalid_inline`, `store`...).

Built only when `storage:` is configured; every series starts at 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REASONS = (
    "host",
    "status",
    "too_large",
    "timeout",
    "connection",
    "empty",
    "invalid_url",
    "redirects",
    "not_image",
    "invalid_inline",
    "io",
    "store",
)


class StorageMetrics:
    def __init__(self, registry: CollectorRegistry, backend: str) -> None:
        self.backend = backend
        self._stored = Counter(
            "dashscope_proxy_stored_images_total",
            "Delivered images written to the image store.",
            ["backend"],
            registry=registry,
        )
        self._bytes = Counter(
            "dashscope_proxy_stored_bytes_total",
            "Bytes of delivered images written to the image store.",
            ["backend"],
            registry=registry,
        )
        self._errors = Counter(
            "dashscope_proxy_storage_errors_total",
            "Delivered images that kept DashScope's own URL because fetching or storing "
            "them failed, by reason.",
            ["backend", "reason"],
            registry=registry,
        )
        self._stored.labels(backend)
        self._bytes.labels(backend)
        for reason in REASONS:
            self._errors.labels(backend, reason)

    def stored(self, size: int) -> None:
        self._stored.labels(self.backend).inc()
        self._bytes.labels(self.backend).inc(size)

    def error(self, reason: str) -> None:
        self._errors.labels(self.backend, reason if reason in REASONS else "store").inc()
