"""The keeping pipeline: every image of an answer fetched (or decoded) and stored, once.

`Keeper.keep(refs, policy)` takes the images of one answer (DashScope URLs or inline
data) and returns, per image, the `StoredObject` it is kept as, or the reason it could
not be (the caller then leaves DashScope's URL in the answer). Images are kept
eagerly and concurrently, and the answer waits at most `policy.timeout_seconds` (the
image fetch timeout): a store that hangs cannot slow answers beyond it. A job still
running then goes on in the background and is kept all the same.

An image already kept (the same task polled again) is found by `stat` and never
fetched twice; two answers holding the same image at once share one job.
URL fetches are streamed into a spool file (`upstream.fetch.fetch_to_file`), so an
image in flight holds well under 1 MB of memory, whatever its size.

`keeper_ctx` opens the backend for the app's lifetime (`app[KEEPER]`, absent without
`storage:`) and runs the retention sweep in the background, in bounded batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.config.model import StorageConfig
from proxy.runtime import METRICS, RUNTIME, SESSION
from proxy.storage.backend import StorageBackend, StorageUnavailable, StoredObject
from proxy.storage.backends import make_backend
from proxy.storage.metrics import StorageMetrics
from proxy.storage.names import (
    CONTENT_TYPES,
    Inline,
    content_type_of,
    inline_image,
    is_url,
    url_name,
)
from proxy.storage.names import sniff_extension as sniff
from proxy.upstream.fetch import FetchFailed, FetchPolicy, fetch_to_file

log = logging.getLogger(__name__)

# Retention sweep: a batch deletes at most SWEEP_BATCH objects, at most SWEEP_BATCHES
# batches per round, one round every `retention / 10` (between 1 s and 5 minutes).
SWEEP_BATCH = 500
SWEEP_BATCHES = 10
SWEEP_MAX_INTERVAL = 300.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One image of an answer: kept as `obj`, or not kept, for `reason`."""

    obj: StoredObject | None
    reason: str | None = None


class Keeper:
    """Stores images in one backend; one per app."""

    def __init__(
        self,
        config: StorageConfig,
        backend: StorageBackend,
        spool: Path,
        session: aiohttp.ClientSession,
        metrics: StorageMetrics,
    ) -> None:
        # Names follow the startup signing key: a reload that rotates the key changes
        # links, never the names of images already kept.
        self.config = config
        self.backend = backend
        self.spool = spool
        self.session = session
        self.metrics = metrics
        self._jobs: dict[str, asyncio.Task[StoredObject]] = {}

    async def keep(self, refs: Sequence[str], policy: FetchPolicy) -> list[Outcome]:
        """Every image of one answer kept, in order, within `policy.timeout_seconds`."""
        # Inline images are decoded and hashed in a worker thread: tens of MB of base64
        # would otherwise hold the event loop.
        inline = {
            ref: await asyncio.to_thread(inline_image, ref, self.config.max_image_bytes)
            for ref in refs
            if not is_url(ref)
        }
        jobs = [self._job(ref, inline.get(ref), policy) for ref in refs]
        tasks = {job for job in jobs if not isinstance(job, str)}
        if tasks:
            await asyncio.wait(tasks, timeout=policy.timeout_seconds)
        out: list[Outcome] = []
        for job in jobs:
            if isinstance(job, str):
                outcome = Outcome(None, job)
            elif not job.done():
                outcome = Outcome(None, "timeout")  # it goes on, and is kept later
            elif job.cancelled():
                outcome = Outcome(None, "store")
            else:
                exc = job.exception()
                if exc is None:
                    outcome = Outcome(job.result())
                elif isinstance(exc, FetchFailed):
                    outcome = Outcome(None, exc.reason)
                else:  # a bug, not an outage: logged in full, the client keeps its image
                    log.error("storing an image failed", exc_info=exc)
                    outcome = Outcome(None, "store")
            if outcome.reason is not None:
                self.metrics.error(outcome.reason)
                log.warning("an image was delivered with DashScope's URL: %s", outcome.reason)
            out.append(outcome)
        return out

    def _job(
        self, ref: str, inline: Inline | None, policy: FetchPolicy
    ) -> asyncio.Task[StoredObject] | str:
        if is_url(ref):
            name = url_name(self.config.signing_key, ref)
            data: bytes | None = None
        elif inline is None:
            return "invalid_inline"
        else:
            name, data = inline.name, inline.data
        job = self._jobs.get(name)
        if job is None:
            job = asyncio.create_task(self._store(name, ref, data, policy))
            self._jobs[name] = job
            job.add_done_callback(functools.partial(self._finished, name))
        return job

    def _finished(self, name: str, job: asyncio.Task[StoredObject]) -> None:
        if self._jobs.get(name) is job:
            del self._jobs[name]
        if not job.cancelled():
            job.exception()  # retrieved: a job that outlived its answer fails quietly

    async def _store(
        self, name: str, ref: str, data: bytes | None, policy: FetchPolicy
    ) -> StoredObject:
        try:
            kept = await self.backend.stat(name)
        except StorageUnavailable as exc:
            raise FetchFailed("the store failed", "store") from exc
        if kept is not None:
            return kept
        spool = str(self.spool / f"{name}.{secrets.token_hex(6)}.part")
        try:
            size, head = await self._spool(ref, data, policy, spool)
        except FetchFailed as exc:
            # The spool directory went away (a volume replaced or remounted): made again,
            # so storing works at once when the volume is back.
            if exc.reason != "io" or await asyncio.to_thread(self.spool.is_dir):
                raise
            try:
                await asyncio.to_thread(self.spool.mkdir, parents=True, exist_ok=True)
            except OSError:
                raise exc from None
            size, head = await self._spool(ref, data, policy, spool)
        try:
            ext = sniff(head)
            if ext is None:
                raise FetchFailed("not an image", "not_image")
            # The format the bytes show wins over the URL's extension.
            ctype = CONTENT_TYPES[ext] if name.endswith("." + ext) else content_type_of(name)
            obj = await self.backend.put(name, spool, ctype)  # consumes the spool file
        except (FetchFailed, StorageUnavailable) as exc:
            await asyncio.to_thread(_discard, spool)  # nothing is left behind
            if isinstance(exc, StorageUnavailable):
                raise FetchFailed("the store failed", "store") from exc
            raise
        self.metrics.stored(size)
        return obj

    async def _spool(
        self, ref: str, data: bytes | None, policy: FetchPolicy, spool: str
    ) -> tuple[int, bytes]:
        """The image into the file `spool`: its size and first bytes."""
        if data is None:
            fetched = await fetch_to_file(self.session, ref, policy, spool)
            return fetched.size, fetched.head
        await _write_file(spool, data)
        return len(data), data[:16]

    async def sweep(self, retention_days: float) -> int:
        """One bounded retention round: objects older than `retention_days` deleted."""
        older_than = time.time() - retention_days * 86400
        deleted = 0
        for _ in range(SWEEP_BATCHES):
            batch = await self.backend.sweep(older_than, SWEEP_BATCH)
            deleted += batch
            if batch < SWEEP_BATCH:
                break
        return deleted

    async def drain(self) -> None:
        """Let stores in flight finish (shutdown), then stop."""
        jobs = list(self._jobs.values())
        if jobs:
            await asyncio.wait(jobs, timeout=10)
        for job in jobs:
            job.cancel()


def _discard(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


async def _write_file(path: str, data: bytes) -> None:
    def write() -> None:
        with open(path, "xb") as handle:
            handle.write(data)

    try:
        await asyncio.to_thread(write)
    except OSError:
        raise FetchFailed("the spool directory cannot be written", "io") from None


KEEPER = web.AppKey("keeper", Keeper)


async def keeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """`app[KEEPER]` when `storage:` is configured, with its retention sweep."""
    config = app[RUNTIME].current.config.storage
    if config is None:
        yield
        return
    try:
        backend, spool = make_backend(config)
    except ImportError as exc:
        # The `s3` extra is missing: the gateway refuses to start, saying what to install.
        log.error("%s", exc)
        raise
    metrics = StorageMetrics(app[METRICS].registry, backend.kind)
    try:
        await backend.open()
    except StorageUnavailable as exc:
        # Serve all the same: images keep DashScope's URLs (degraded) until it works.
        log.error("the image store (%s) cannot be opened: %s", backend.kind, exc.reason)
    keeper = app[KEEPER] = Keeper(config, backend, spool, app[SESSION], metrics)
    sweeper = asyncio.create_task(_sweep_forever(app, keeper))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await keeper.drain()
        await backend.close()


async def _sweep_forever(app: web.Application, keeper: Keeper) -> None:
    while True:
        storage = app[RUNTIME].current.config.storage or keeper.config
        interval = min(max(storage.retention_days * 8640, 1.0), SWEEP_MAX_INTERVAL)
        await asyncio.sleep(interval)
        try:
            deleted = await keeper.sweep(storage.retention_days)
        except StorageUnavailable as exc:
            log.warning("image retention sweep failed: %s", exc.reason)
            continue
        except Exception:
            log.exception("image retention sweep failed")
            continue
        if deleted:
            log.info(
                "image retention: deleted %d image(s) older than %g days",
                deleted,
                storage.retention_days,
            )
