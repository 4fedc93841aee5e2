"""The usage ledger: an append-only JSONL file with one line per metered event, for chargeback.

On by default (`server.usage_log`, default `./dashscope-proxy-usage.jsonl`; `null`
turns it off). A `Meter` listener: every time the gateway records images (the same
moment `dashscope_proxy_images_total` grows) one line is appended:

    {"ts": "2026-11-22T02:50:46.123Z", "key": "team-a", "model": "qwen-image-3.0-pro",
     "images": 2, "cost": 0.08, "currency": "USD", "width": 1024, "height": 1024,
     "route": "multimodal-generation", "upstream": "intl", "request_id": "...",
     "task_id": null}

`cost` is what the images cost under `pricing:` when they were metered (null for a
model with no price, with `currency` null too); `width`/`height` the delivered size
DashScope reported (null when it did not). `dashscope-proxy usage` sums these lines.

An answer that could carry images but was never received whole (read timeout,
truncated or invalid body, cut at the end of a drain) gets a line too, with
`"images": null` and a `"reason"` (as `dashscope_proxy_unmetered_answers_total`):
DashScope may have billed images that no count shows, so a reader summing
`images` must skip null, and a null line with a `task_id` is settled by a later
line of the same task if a later poll counted it.

Durability policy, and why:
- The file is opened `O_APPEND` and never truncated, so a restart continues it.
  Each line is written whole within a single `write()` (lines metered at the
  same moment share one): lines from several workers (or a restarted process)
  appending to the same file never interleave on a local filesystem (not NFS).
- After every line the data is in the kernel (no user-space buffer): a crash,
  `SIGKILL` or OOM kill of the gateway loses nothing already counted.
- `fsync` runs at most once a second when something was written, and at
  shutdown: a power loss or kernel crash loses at most about a second. An
  fsync per line would cost a disk flush per image request for no gain a
  chargeback report can see.
- A line torn by a crash mid-write (or a full disk) is terminated with a
  newline when the file is next opened, so consumers can skip the one line
  that does not parse and read on.
- Rotation: rename the file at any time; the next write notices (as Python's
  `WatchedFileHandler` does: the inode changed) and starts a new file at the
  configured path. Every config reload (SIGHUP included) reopens the file too, at
  once. `copytruncate` also works, because of `O_APPEND`.
- A reload can turn the ledger on, off, or move it: `proxy.ops.ledger_follow` notices the
  new runtime (at the next line, or within a second) and opens the new path before
  closing the old one. If the new path cannot be opened, lines keep going to the old
  file (nothing is lost) and the error is logged and counted.

A line is appended from the event loop itself while appends are quick (a
`write()` into the page cache takes microseconds; handing it to a thread and
back costs more than the write). The first append slower than
`INLINE_SECONDS` moves appends to one dedicated thread for
`SLOW_BACKOFF_SECONDS`, so a stalling disk stalls the loop at most once per
back-off; opening, rotation and `fsync` always run on that thread. While the
thread is in `fsync`, lines wait for it instead (the journal commit an fsync
starts can hold a concurrent `write()` for milliseconds: the loop would stall,
and a busy but healthy disk would look like a stalling one). Lines keep their
order: a line goes inline only when nothing is queued for the thread, and the
queue goes back to inline appends as soon as they are allowed again.
If a line cannot be written it is logged at ERROR level in full (it holds no
secret: key and upstream *names*) and counted in
`dashscope_proxy_usage_log_errors_total`; the image metric has already counted it.

Deliberately not here: reading or summing the ledger (`proxy.ops.usage_report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from proxy.jsonutil import dumps
from proxy.metering import UnmeteredEvent, UsageEvent
from proxy.metrics import Metrics
from proxy.ops.accesslog import rfc3339

log = logging.getLogger(__name__)

FSYNC_SECONDS = 1.0
# An inline append slower than this sends appends to the ledger thread for a while.
INLINE_SECONDS = 0.002
SLOW_BACKOFF_SECONDS = 30.0
# Owner read/write, group read (a log shipper in the group may read it).
FILE_MODE = 0o640


def ledger_line(event: UsageEvent | UnmeteredEvent) -> bytes:
    """Pure: the JSONL line for one metered event, or for an answer nothing could count
    (`"images": null` and its `"reason"`)."""
    line: dict[str, object] = {
        "ts": rfc3339(event.timestamp),
        "key": event.key,
        "model": event.model[:128] if event.model is not None else None,
        "images": event.images if isinstance(event, UsageEvent) else None,
        "cost": None,
        "currency": None,
        "width": None,
        "height": None,
        "route": event.route,
        "upstream": event.upstream,
        "request_id": event.request_id,
        "task_id": event.task_id,
    }
    if isinstance(event, UsageEvent):
        line["cost"], line["currency"] = event.cost, event.currency
        line["width"], line["height"] = event.width, event.height
    else:
        line["reason"] = event.reason
    return dumps(line) + b"\n"


class UsageLedger:
    """Appends `ledger_line`s to `path`; a `Meter` listener (call it with a `UsageEvent`)."""

    def __init__(self, path: str, metrics: Metrics, fsync_seconds: float = FSYNC_SECONDS) -> None:
        self.path = path
        self._metrics = metrics
        self._fsync_seconds = fsync_seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._dirty = False
        self._regular = True
        self._flusher: asyncio.Task[None] | None = None
        # Lines waiting for the thread, and the task writing them (see _submit).
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._thread_ops = 0  # open/reopen/close running on the thread: no inline append
        self._syncing = False  # the thread is in fsync: no inline append (see _inline_ok)
        self._inline_after = 0.0  # monotonic time before which appends go to the thread

    # -- everything below `_` runs on the ledger thread --------------------------------

    def _open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        st = os.fstat(fd)
        # A pipe or /dev/stdout works too: no torn-line repair, no fsync.
        self._regular = stat.S_ISREG(st.st_mode)
        if self._regular and st.st_size:
            # A line torn by a crash: end it so the next line starts clean.
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                os.write(fd, b"\n")
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)

    def _reopen_if_rotated(self) -> None:
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current != self._identity:
            self._close()
            self._open()

    def _reopen(self) -> None:
        self._close()
        self._open()

    def _append_batch(self, data: bytes) -> int:
        """Append queued lines with one write(); how many bytes landed (short on a full disk)."""
        self._reopen_if_rotated()
        assert self._fd is not None
        written = os.write(self._fd, data)
        self._dirty = True
        return written

    def _append_inline(self, data: bytes) -> int | None:
        """On the event loop: append `data` unless the file was rotated (None: the thread
        reopens it). Bytes written, as `_append_batch`."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        if self._fd is None or (st.st_dev, st.st_ino) != self._identity:
            return None
        written = os.write(self._fd, data)
        self._dirty = True
        return written

    def _sync(self) -> None:
        if self._dirty and self._fd is not None and self._regular:
            self._dirty = False
            os.fsync(self._fd)

    # -- the event loop side -----------------------------------------------------------

    async def _run(self, fn: Callable[[], None]) -> None:
        self._thread_ops += 1
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._thread_ops -= 1

    async def open(self) -> None:
        await self._run(self._open)
        self._flusher = asyncio.create_task(self._flush_loop(), name="usage-ledger-fsync")

    async def reopen(self) -> None:
        """Close and open the path again (after a reload: logrotate's `create` + SIGHUP),
        in order with the lines being written."""
        await self._run(self._reopen)

    async def __call__(self, event: UsageEvent | UnmeteredEvent) -> None:
        line = ledger_line(event)
        try:
            # Appended at once when it can be; else queued and shielded: once
            # submitted the line is written even if the request is cancelled
            # meanwhile (shutdown after the grace period).
            pending = self._submit(line)
            if pending is not None:
                await asyncio.shield(pending)
        except OSError as exc:
            self._metrics.usage_log_errors.inc()
            log.error(
                "usage ledger %s: write failed (%s); lost line: %s",
                self.path,
                exc.strerror or exc,
                line.decode("utf-8", "replace").rstrip(),
            )

    def _inline_ok(self) -> bool:
        """May an append run on the event loop now? Not while the thread opens, reopens
        or closes the file, not during a back-off after a slow append, and not while
        the thread is in `fsync`: the journal commit it starts can hold a concurrent
        `write()` for milliseconds, which would stall the loop and look like a slow disk."""
        return (
            self._regular
            and not self._thread_ops
            and not self._syncing
            and self._inline_after <= time.monotonic()
        )

    def _write_inline(self, data: bytes) -> int | None:
        """`_append_inline`, timed: a slow one starts the back-off (appends go to the
        thread for `SLOW_BACKOFF_SECONDS`)."""
        started = time.perf_counter()
        written = self._append_inline(data)
        if written is not None and time.perf_counter() - started > INLINE_SECONDS:
            self._inline_after = time.monotonic() + SLOW_BACKOFF_SECONDS
            log.warning(
                "usage ledger %s: a write took over %g ms; writing from a thread for %g s",
                self.path,
                INLINE_SECONDS * 1000,
                SLOW_BACKOFF_SECONDS,
            )
        return written

    def _submit(self, line: bytes) -> asyncio.Future[None] | None:
        """Append `line` now (None: it is in the kernel; OSError: it failed), or queue it:
        the future completes once it is in the kernel (or fails).

        One thread hop per *batch*, not per line: lines metered while a write
        is on the thread go out together in the next single write(), still in
        order and each whole. Under load that turns a hop per image request
        (about a third of the gateway's CPU at 1,000 requests/s) into a few
        per second; at low rates a batch is one line, as before.
        """
        if self._closed:
            raise OSError(f"usage ledger {self.path} is closed")
        if self._writer is None and self._inline_ok():
            written = self._write_inline(line)
            if written is not None:
                if written != len(line):  # a line cut short lands torn (repaired on the next open)
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((line, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued(), name="usage-ledger-write")
        return fut

    async def _write_queued(self) -> None:
        """Write what is queued, in order: from the event loop again as soon as that is
        allowed (so the ledger does not stay on the thread while lines keep arriving
        during each hop), else one thread hop per batch."""
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                data = b"".join(line for line, _ in batch)
                error: BaseException | None = None
                try:
                    written = self._write_inline(data) if self._inline_ok() else None
                    if written is None:
                        written = await asyncio.get_running_loop().run_in_executor(
                            self._executor, partial(self._append_batch, data)
                        )
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    written, error = 0, exc
                end = 0
                for line, fut in batch:
                    end += len(line)
                    if fut.done():
                        continue
                    if end <= written:
                        fut.set_result(None)
                    else:
                        # A line cut short lands torn (repaired on the next open).
                        fut.set_exception(
                            error or OSError(f"short write ({written} of {len(data)} bytes)")
                        )
        finally:
            self._writer = None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._fsync_seconds)
            self._syncing = True
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._sync)
            except OSError as exc:
                log.error("usage ledger %s: fsync failed (%s)", self.path, exc.strerror or exc)
            finally:
                self._syncing = False

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._writer is not None:
            await self._writer  # lines already metered are written before closing
        await self._run(self._close)
        self._executor.shutdown(wait=True)
