"""`storage.backend: local`: images kept as files in one directory (the embedded default).

Layout under `storage.path`: `objects/<first two digits>/<name>` (at most 256 files'
worth of directories per level, so no directory grows to millions of entries) and
`incoming/`, where the fetcher streams images before they are stored. Both are in the
same directory tree, so storing is one atomic `os.replace`: a reader sees a whole
image or none. Every file operation runs in a worker thread, never on the event loop.

An object's `stored_at` is its file's mtime; the retention sweep deletes files older
than `retention_days` in bounded batches, and forgets abandoned `incoming/` files.
Several replicas can share the directory only through a shared volume (one
ReadWriteMany volume, NFS...): each replica otherwise has its own images.

Deliberately not here: fetching, names, links (a backend only keeps bytes by name).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from proxy.config.model import StorageConfig
from proxy.storage.backend import StorageUnavailable, StoredObject
from proxy.storage.names import content_type_of, is_name

CHUNK = 64 * 1024
# An `incoming/` file this old was left by a process that died while fetching.
_ABANDONED_SECONDS = 3600.0
T = TypeVar("T")


class LocalBackend:
    """A directory of images."""

    kind = "local"

    def __init__(self, config: StorageConfig) -> None:
        self.root = Path(config.path)
        self.objects = self.root / "objects"
        self.spool_dir = self.root / "incoming"

    def _path(self, name: str) -> Path:
        if not is_name(name):  # callers check too; a backend never trusts a name
            raise StorageUnavailable("invalid_name")
        return self.objects / name[:2] / name

    async def open(self) -> None:
        def make() -> None:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.spool_dir.mkdir(parents=True, exist_ok=True)

        await _io(make)

    async def close(self) -> None:
        return None

    async def stat(self, name: str) -> StoredObject | None:
        path = self._path(name)

        def look() -> StoredObject | None:
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            return _object(name, st)

        return await _io(look)

    async def put(self, name: str, source: str, content_type: str) -> StoredObject:
        path = self._path(name)

        def move() -> StoredObject:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, path)
            finally:
                if os.path.exists(source):
                    os.unlink(source)
            return _object(name, path.stat())

        return await _io(move)

    async def read(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(name)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise StorageUnavailable("io", type(exc).__name__) from None
        try:
            await asyncio.to_thread(handle.seek, start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                size = CHUNK if left is None else min(CHUNK, left)
                chunk = await asyncio.to_thread(handle.read, size)
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    async def sweep(self, older_than: float, limit: int) -> int:
        def sweep() -> int:
            deleted = 0
            for directory in sorted(self.objects.iterdir()) if self.objects.is_dir() else ():
                for entry in os.scandir(directory):
                    if deleted >= limit:
                        return deleted
                    if entry.is_file() and entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)
                        deleted += 1
            abandoned = time.time() - _ABANDONED_SECONDS
            for entry in os.scandir(self.spool_dir) if self.spool_dir.is_dir() else ():
                if entry.is_file() and entry.stat().st_mtime < abandoned:
                    os.unlink(entry.path)
            return deleted

        return await _io(sweep)

    async def check(self) -> None:
        def probe() -> None:
            if not self.objects.is_dir() or not os.access(self.objects, os.W_OK):
                raise NotADirectoryError(str(self.objects))

        await _io(probe)


def _object(name: str, st: os.stat_result) -> StoredObject:
    # Names are derived from the image, so name and size identify the bytes.
    return StoredObject(
        name=name,
        size=st.st_size,
        etag=f"{name.partition('.')[0][:32]}-{st.st_size:x}",
        content_type=content_type_of(name),
        stored_at=st.st_mtime,
    )


async def _io(fn: Callable[[], T]) -> T:
    """Run `fn` in a worker thread; an OS error becomes StorageUnavailable (no path)."""
    try:
        return await asyncio.to_thread(fn)
    except StorageUnavailable:
        raise
    except OSError as exc:
        raise StorageUnavailable("io", type(exc).__name__) from None
