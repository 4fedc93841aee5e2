"""What every storage backend keeps: objects by name, written whole, read by range.

An object is written once from a complete local file (the fetcher streams each image into a
temporary file first, so no image is ever held whole in memory) and never changed: a name is
derived from what the image is, so writing it again writes the same bytes. Backends:
`proxy.storage.local` (a directory) and `proxy.storage.s3` (any S3-compatible store).

Every method raises `StorageUnavailable` (with a short reason that holds no secret and no
URL) when the store cannot be reached or refuses; a missing object is `None`, not an error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class StorageUnavailable(Exception):
    """The store failed: `reason` is a short metric label (`timeout`, `refused`, `io`...)."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One stored image as the store knows it."""

    name: str
    size: int
    etag: str  # a strong validator, without quotes
    content_type: str
    stored_at: float  # unix seconds: when it was written (retention counts from here)


class StorageBackend(Protocol):
    """A place to keep images. One instance per process, opened once, closed once."""

    kind: str  # "local" | "s3": the `backend` label of the storage metrics

    async def open(self) -> None:
        """Connect (and for `local`, create the directory); raises StorageUnavailable."""

    async def close(self) -> None: ...

    async def stat(self, name: str) -> StoredObject | None:
        """The object called `name`, or None when it is not kept."""

    async def put(self, name: str, source: str, content_type: str) -> StoredObject:
        """Store the complete file at path `source` as `name` (atomically: a reader never
        sees part of an object). `source` is consumed: moved or deleted afterwards."""

    def read(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes of `name` from `start` up to and including `end` (None: to the last),
        in chunks of at most 64 KiB."""

    async def sweep(self, older_than: float, limit: int) -> int:
        """Delete at most `limit` objects stored before `older_than` (unix seconds); how
        many were deleted. A store with its own lifecycle rules may delete nothing."""

    async def check(self) -> None:
        """Raise StorageUnavailable when the store cannot be used now (readiness)."""
