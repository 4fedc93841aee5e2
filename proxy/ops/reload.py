"""Config reload without restart: on SIGHUP, and when the config file changes.

A reload re-reads the file, validates it completely (`load_config`: every
problem, each with its location), builds a new `Runtime` and swaps it into
`RuntimeHolder.current` with one assignment. Handlers take the runtime once
when they start, so a request in flight finishes on the config it started
with, and the next request sees the new one. A rejected config changes
nothing: every problem is logged, `dashscope_proxy_config_reloads_total
{result="failure"}` grows, `dashscope_proxy_config_last_reload_successful`
drops to 0, and the old config keeps serving.

Watching: `os.stat` of the path every second, in a task owned by the app.
`stat` follows symlinks, so the resolved target is what is compared (path,
device, inode, size, mtime): a Kubernetes ConfigMap update, which swaps the
`..data` symlink to a new directory, is seen like an in-place edit or an
editor's rename. A change is acted on once the file has stopped changing for
a moment (editors and `kubectl cp` write in several steps). A file that
changed but parses to the same config (a `touch`, a comment) is not a reload.
SIGHUP always reloads and always counts.

Some settings are bound when the process starts and cannot change without a
restart (`restart_required` lists them); a reload that changes them applies
everything else and logs a warning naming each one.

Deliberately not here: the signal handler itself (`server.serve` installs it)
and anything that must outlive a config (the ClientSession, the task store,
metrics), which hang off the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from proxy.config.model import Config, ConfigError
from proxy.config.parse import Signature, file_signature, load_config
from proxy.fronts.ops import probe_keys
from proxy.runtime import METRICS, RUNTIME, SESSION, Runtime
from proxy.upstream.health import UPSTREAMS

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# How long a changed file must stay unchanged before it is read.
SETTLE_SECONDS = 0.2


def restart_required(startup: Config, new: Config) -> list[str]:
    """Pure: the changes in `new` that take effect only after a restart, one line each.

    Compared with the config the process *started* with, because that is what
    the listening socket, the worker processes, the task store, the usage
    ledger and the connection pool were built from.
    """
    out: list[str] = []
    old_s, new_s = startup.server, new.server
    for name in (
        "host",
        "port",
        "backlog",
        "workers",
        "shutdown_grace_seconds",
        "metrics_port",
        "final_scrape_seconds",
    ):
        before, after = getattr(old_s, name), getattr(new_s, name)
        if before != after:
            out.append(f"server.{name}: {before!r} -> {after!r}")
    if new_s.max_body_bytes > old_s.max_body_bytes:
        # Lowering it works at once (checked per request); raising it past the
        # HTTP server's cap, set at startup, does not.
        out.append(
            f"server.max_body_bytes: raised {old_s.max_body_bytes} -> "
            f"{new_s.max_body_bytes} (lowering applies at once)"
        )
    for name in ("backend", "path", "url", "password", "tls_ca_file"):
        before, after = getattr(startup.state, name), getattr(new.state, name)
        if before != after:
            # The URL may carry a password: name the field, not the value.
            shown = "changed" if name in ("url", "password") else f"{before!r} -> {after!r}"
            out.append(f"state.{name}: {shown}")
    out.extend(_storage_restart(startup, new))
    # The ClientSession lives as long as the app, so in-flight requests keep
    # their connections and new upstreams simply work. Its connector's per-host
    # ceiling is sized once, from the startup config; per-upstream caps below
    # it apply at once, a cap raised above it waits for a restart.
    old_cap = max((u.max_connections for u in startup.upstreams), default=0)
    new_cap = max((u.max_connections for u in new.upstreams), default=0)
    if new_cap > old_cap:
        out.append(
            f"upstreams[].max_connections: raised to {new_cap}, above the connection "
            f"pool's startup ceiling of {old_cap} per host"
        )
    return out


# `storage:` fields the image store is opened with; the link fields (`signing_key`,
# `public_base_url`, `link_ttl_seconds`, `retention_days`, `max_image_bytes`) apply at once.
_STORE_FIELDS = ("backend", "path", "bucket", "endpoint_url", "region", "prefix")
_STORE_SECRETS = ("access_key_id", "secret_access_key")


def _storage_restart(startup: Config, new: Config) -> list[str]:
    old_s, new_s = startup.storage, new.storage
    if old_s is None and new_s is not None:
        return ["storage: turned on (images are kept from the next start)"]
    if old_s is None or new_s is None:
        return []  # turned off: applies at once, links already handed out keep working
    out = [
        f"storage.{name}: {getattr(old_s, name)!r} -> {getattr(new_s, name)!r}"
        for name in _STORE_FIELDS
        if getattr(old_s, name) != getattr(new_s, name)
    ]
    out += [
        f"storage.{name}: changed"
        for name in _STORE_SECRETS
        if getattr(old_s, name) != getattr(new_s, name)
    ]
    return out


def describe_changes(old: Config, new: Config) -> str:
    """Pure: a short summary of what a reload changed, by name (never a secret)."""
    parts: list[str] = []
    for what, before, after in (
        ("keys", {k.name: k for k in old.keys}, {k.name: k for k in new.keys}),
        ("upstreams", {u.name: u for u in old.upstreams}, {u.name: u for u in new.upstreams}),
    ):
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(n for n in after.keys() & before.keys() if after[n] != before[n])
        for sign, names in (("+", added), ("-", removed), ("~", changed)):
            if names:
                parts.append(f"{what} {sign}{','.join(names)}")
    if old.models != new.models:
        parts.append("models changed")
    if old.server != new.server:
        parts.append("server changed")
    for name in ("openai", "pricing", "tasks", "storage"):
        if getattr(old, name) != getattr(new, name):
            parts.append(f"{name} changed")
    return "; ".join(parts) or "no effective change"


class Reloader:
    """Reloads the app's config from `path`: on `request()` (SIGHUP) and when the file changes.

    Reloads run one at a time in the app-owned watch task. `poll_seconds=0`
    turns file watching off (SIGHUP still works).
    """

    def __init__(
        self,
        app: web.Application,
        path: str | os.PathLike[str],
        *,
        poll_seconds: float = POLL_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
        load: Callable[[str], Config] = load_config,
        loaded_signature: Signature | None = None,
    ) -> None:
        self._app = app
        self.path = str(path)
        self._startup = app[RUNTIME].current.config
        self._poll = poll_seconds
        self._settle = settle_seconds
        self._load = load
        self._wake = asyncio.Event()
        self._forced = 0
        self._task: asyncio.Task[None] | None = None
        # The file's signature from *before* the startup config was read, so a
        # change landing while the process starts is still seen.
        self._loaded_signature = loaded_signature
        self._failed = False  # the last reload was rejected (its metric says 0)
        self._probe: asyncio.Future[None] | None = None  # the key probe after a reload

    def request(self) -> None:
        """Reload as soon as possible (called from the SIGHUP handler)."""
        self._forced += 1
        self._wake.set()

    async def reload(self, trigger: str, *, skip_unchanged: bool = False) -> bool:
        """Read, validate and swap. True if the new config is serving (or nothing changed)."""
        metrics = self._app[METRICS]
        holder = self._app[RUNTIME]
        loop = asyncio.get_running_loop()
        try:
            # Parsing is pure CPU but the read may touch a slow volume.
            config = await loop.run_in_executor(None, self._load, self.path)
        except ConfigError as exc:
            self._failed = True
            metrics.config_reloaded(False, time.time())
            log.error(
                "config reload (%s) rejected, still serving the previous config: "
                "%s has %d problem(s)",
                trigger,
                self.path,
                len(exc.problems),
            )
            for problem in exc.problems:
                log.error("config reload rejected: %s: %s", self.path, problem)
            return False
        if skip_unchanged and config == holder.current.config:
            if self._failed:
                # The file is valid again and is what is serving (say, a bad edit was
                # restored byte for byte): the failed-reload signal must clear, or the
                # alert on it fires until someone sends SIGHUP.
                self._failed = False
                metrics.config_reloaded(True, time.time())
                log.info(
                    "config file %s is valid again and matches the running config: "
                    "the earlier rejected reload is resolved",
                    self.path,
                )
                return True
            log.info("config file %s changed but its content did not: nothing to reload", self.path)
            return True
        try:
            runtime = Runtime.build(config, holder.current)
        except Exception:
            self._failed = True
            metrics.config_reloaded(False, time.time())
            log.exception(
                "config reload (%s) rejected: the new config could not be built; "
                "still serving the previous config",
                trigger,
            )
            return False
        summary = describe_changes(holder.current.config, config)
        # The swap: one assignment. Requests that already took the old
        # runtime finish on it; the next request takes this one.
        holder.current = runtime
        self._failed = False
        if UPSTREAMS in self._app:  # new upstreams' health series exist at once
            self._app[UPSTREAMS].precreate(config.upstreams)
            if SESSION in self._app:  # a changed key is known good or bad at once
                self._probe = asyncio.ensure_future(probe_keys(self._app))
        metrics.config_reloaded(True, time.time())
        log.info("config reloaded (%s) from %s: %s", trigger, self.path, summary)
        for change in restart_required(self._startup, config):
            log.warning("config reload: takes effect only after a restart: %s", change)
        return True

    async def _watch(self) -> None:
        last = self._loaded_signature or file_signature(self.path)
        while True:
            timeout = self._poll if self._poll > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._forced:
                self._forced = 0
                last = file_signature(self.path)
                await self._guarded("SIGHUP")
                continue
            if self._poll <= 0:
                continue
            current = file_signature(self.path)
            if current == last:
                continue
            if current is None:
                log.warning(
                    "config file %s cannot be read; still serving the last good config", self.path
                )
                last = None
                continue
            await asyncio.sleep(self._settle)
            if file_signature(self.path) != current:
                continue  # still being written; look again next round
            last = current
            await self._guarded("file changed", skip_unchanged=True)

    async def _guarded(self, trigger: str, *, skip_unchanged: bool = False) -> None:
        # The watch task must survive anything a reload does.
        try:
            await self.reload(trigger, skip_unchanged=skip_unchanged)
        except Exception:
            log.exception("config reload failed unexpectedly; still serving the previous config")

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: the watch task lives exactly as long as the app."""
        self._task = asyncio.create_task(self._watch(), name="config-watch")
        try:
            yield
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def install_reloader(
    app: web.Application,
    path: str | os.PathLike[str],
    *,
    poll_seconds: float = POLL_SECONDS,
    loaded_signature: Signature | None = None,
) -> Reloader:
    """Attach a Reloader for `path` to `app` (before the app starts).

    `loaded_signature`: `file_signature(path)` taken just before the running
    config was read from it.
    """
    reloader = Reloader(
        app, Path(path), poll_seconds=poll_seconds, loaded_signature=loaded_signature
    )
    app.cleanup_ctx.append(reloader.ctx)
    return reloader
