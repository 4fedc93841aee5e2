"""Configuration: YAML -> frozen dataclasses, validated once, every problem reported at once.

The file format is the contract in PRODUCT.md. Parsing is a pure function of
(text, environ): `parse_config(text, environ)` returns a `Config` or raises
`ConfigError` carrying *every* problem found, each with its location
(`keys[2].key_sha256: must be 64 hex characters`). Unknown fields are errors,
because typos are the commonest config bug.

Deliberately not here: reading the environment for anything but `${VAR}`
interpolation, and any I/O except `load_config(path)` reading one file and
`file_signature(path)` stat-ing it (what proxy.ops.reload watches).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.core.catalogue import family, override_problem

__all__ = [
    "Config",
    "ConfigError",
    "ImageFetchConfig",
    "KeyConfig",
    "LimitsConfig",
    "ModelOverride",
    "OpenAIConfig",
    "ServerConfig",
    "StateConfig",
    "TasksConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "Signature",
    "file_signature",
    "sha256_hex",
]


class ConfigError(Exception):
    """A config that cannot be used. `problems` lists every one, each `location: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def sha256_hex(secret: str) -> str:
    """The `key_sha256` form of a bearer key."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the gateway listens and what it accepts."""

    host: str = "0.0.0.0"
    port: int = 8080
    # Requests carry base64 images (wan2.6-image accepts up to 10 MB per image,
    # four of them); 32 MiB leaves room for that and refuses anything absurd.
    max_body_bytes: int = 32 * 1024 * 1024
    # aiohttp's run_app defaults to 128, which drops connections under a burst
    # of thousands of long image requests.
    backlog: int = 4096
    # Seconds in-flight requests get to finish after SIGTERM (keep it below
    # the pod's terminationGracePeriodSeconds).
    shutdown_grace_seconds: float = 30.0
    # Worker processes sharing the port (SO_REUSEPORT); 1 = single process.
    workers: int = 1
    # One JSON line per request on stdout.
    access_log: bool = True
    # Whether access-log lines may hold the prompt (truncated). Off by default.
    log_prompts: bool = False
    # Append-only JSONL ledger of metered images, for chargeback. None = off.
    usage_log: str | None = None


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Upstream timeouts in seconds. Image generation takes minutes, not seconds."""

    connect: float = 10.0
    # Longest silence between bytes from DashScope (a sync qwen-image call can
    # compute for a minute or more before the first byte).
    read: float = 300.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """Take an upstream out after `failures` failures in a row; probe after `cooldown_seconds`."""

    failures: int = 5
    cooldown_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One DashScope account or region the gateway may call."""

    name: str
    base_url: str
    api_key: str = field(repr=False)
    models: tuple[str, ...] = ("*",)
    priority: int = 0
    weight: int = 1
    max_connections: int = 10000
    max_concurrency: int | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    def serves(self, model: str) -> bool:
        """Does a `models` pattern match `model`, or (a dated snapshot) its family?"""
        if any(fnmatchcase(model, pattern) for pattern in self.models):
            return True
        base = family(model)
        return base != model and any(fnmatchcase(base, pattern) for pattern in self.models)

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Per-key limits; None = unlimited."""

    requests_per_minute: int | None = None
    concurrent_requests: int | None = None
    images_per_day: int | None = None
    images_per_month: int | None = None


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """A caller of the gateway. Only the SHA-256 of its secret is kept."""

    name: str
    key_sha256: str = field(repr=False)
    models: tuple[str, ...] = ("*",)
    limits: LimitsConfig = LimitsConfig()

    def allows(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True, slots=True)
class ModelOverride:
    """Per-model override of the built-in routing table."""

    target: str | None = None
    mode: str | None = None  # "sync" | "async": how the gateway calls DashScope
    async_only: bool = False  # /v1/images/generations answers with a task object


@dataclass(frozen=True, slots=True)
class StateConfig:
    """What must survive restarts and be shared by replicas."""

    backend: str = "local"
    path: str = "./dashscope-proxy-state.db"
    url: str | None = None


@dataclass(frozen=True, slots=True)
class TasksConfig:
    """The background reconciler: tasks nobody polls are still counted.

    Every recorded task that is not final is polled by the gateway itself, first
    `reconcile_after_seconds` after it was created, then at growing intervals up to
    `reconcile_max_interval_seconds`, until DashScope reports it final or forgets it.
    The polls are paced (`reconcile_polls_per_second`, `reconcile_concurrency` per
    process) so thousands of outstanding tasks never burst DashScope.
    """

    reconcile_after_seconds: float = 60.0
    reconcile_max_interval_seconds: float = 300.0
    reconcile_polls_per_second: float = 20.0
    reconcile_concurrency: int = 8
    reconcile: bool = True  # false: tasks are counted only when a client polls them


@dataclass(frozen=True, slots=True)
class ImageFetchConfig:
    """Fetching result images for `response_format: b64_json` (an SSRF surface)."""

    # Host globs; upstream hosts are always added. DashScope's result hosts
    # live under aliyuncs.com.
    allowed_hosts: tuple[str, ...] = ("*.aliyuncs.com",)
    max_bytes: int = 32 * 1024 * 1024
    timeout_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    """The OpenAI-compatible images API."""

    default_response_format: str = "b64_json"
    # How long /v1/images/generations waits for a task DashScope runs async.
    sync_wait_seconds: float = 600.0
    task_retention_seconds: float = 86400.0
    image_fetch: ImageFetchConfig = ImageFetchConfig()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated gateway configuration."""

    server: ServerConfig
    upstreams: tuple[UpstreamConfig, ...]
    keys: tuple[KeyConfig, ...]
    models: Mapping[str, ModelOverride] = field(default_factory=dict)
    state: StateConfig = StateConfig()
    openai: OpenAIConfig = OpenAIConfig()
    tasks: TasksConfig = TasksConfig()

    def upstreams_for(self, model: str) -> tuple[UpstreamConfig, ...]:
        """Upstreams serving `model`, in config order."""
        return tuple(u for u in self.upstreams if u.serves(model))


# --------------------------------------------------------------------------- parsing

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# libyaml's safe loader when PyYAML has it: ~10x faster on a config with a
# thousand keys, which a reload parses while the gateway serves.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
# Fields whose value a problem message must never echo (problems are logged on reload).
_SECRET_FIELDS = frozenset({"key", "api_key"})


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}" if where else message)


def _interpolate(value: Any, where: str, environ: Mapping[str, str], p: _Problems) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in environ:
                p.add(where, f"environment variable {name} is not set")
                return m.group(0)  # keep the text so later checks do not pile on
            return environ[name]

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{where}.{k}" if where else str(k), environ, p)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", environ, p) for i, v in enumerate(value)]
    return value


class _Section:
    """Typed reads from one mapping, recording problems instead of raising."""

    def __init__(self, data: Any, where: str, p: _Problems, allowed: set[str]) -> None:
        self.where = where
        self.p = p
        if data is None:
            data = {}
        if not isinstance(data, dict):
            p.add(where, "must be a mapping")
            data = {}
        self.data: dict[str, Any] = data
        for k in data:
            if k not in allowed:
                hint = sorted(allowed)
                p.add(self.loc(str(k)), f"unknown field (expected one of: {', '.join(hint)})")

    def loc(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any, check: Callable[[Any], bool], kind: str) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        v = self.data[key]
        if not check(v):
            shown = f"a {type(v).__name__} (value not shown)" if key in _SECRET_FIELDS else repr(v)
            self.p.add(self.loc(key), f"must be {kind}, got {shown}"[:200])
            return default
        return v

    def text(self, key: str, default: Any = None, required: bool = False) -> Any:
        if required and self.data.get(key) in (None, ""):
            self.p.add(self.loc(key), "is required")
            return default
        return self._get(key, default, lambda v: isinstance(v, str), "a string")

    def flag(self, key: str, default: bool) -> bool:
        return bool(self._get(key, default, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, key: str, default: Any, minimum: int = 0, maximum: int | None = None) -> Any:
        def ok(v: Any) -> bool:
            return (
                isinstance(v, int)
                and not isinstance(v, bool)
                and v >= minimum
                and (maximum is None or v <= maximum)
            )

        rng = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        return self._get(key, default, ok, rng)

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        def ok(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and v >= minimum

        return float(self._get(key, default, ok, f"a number >= {minimum:g}"))

    def globs(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            self.p.add(self.loc(key), "must be a non-empty list of glob patterns")
            return default
        return tuple(v)

    def section(self, key: str, allowed: set[str]) -> _Section:
        return _Section(self.data.get(key), self.loc(key), self.p, allowed)

    def items(self, key: str) -> list[Any]:
        v = self.data.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.p.add(self.loc(key), "must be a list")
            return []
        return v


def _parse_server(s: _Section) -> ServerConfig:
    d = ServerConfig()
    usage_log = s.text("usage_log")
    return ServerConfig(
        host=s.text("host", d.host),
        port=s.integer("port", d.port, 0, 65535),
        max_body_bytes=s.integer("max_body_bytes", d.max_body_bytes, 1024),
        backlog=s.integer("backlog", d.backlog, 1),
        shutdown_grace_seconds=s.number("shutdown_grace_seconds", d.shutdown_grace_seconds),
        workers=s.integer("workers", d.workers, 1, 256),
        access_log=s.flag("access_log", d.access_log),
        log_prompts=s.flag("log_prompts", d.log_prompts),
        usage_log=usage_log,
    )


_UPSTREAM_FIELDS = {
    "name",
    "base_url",
    "api_key",
    "models",
    "priority",
    "weight",
    "max_connections",
    "max_concurrency",
    "timeouts",
    "circuit_breaker",
}


def _parse_upstream(s: _Section) -> UpstreamConfig | None:
    name = s.text("name", "", required=True)
    if name and not _NAME.match(name):
        s.p.add(s.loc("name"), "must be 1-63 letters, digits, '_', '.', '-'")
    base_url = s.text("base_url", "", required=True)
    if base_url:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            s.p.add(s.loc("base_url"), f"must be an http(s) URL, got {base_url!r}")
        elif parts.query or parts.fragment:
            s.p.add(s.loc("base_url"), "must not have a query or fragment")
    api_key = s.text("api_key", "", required=True)
    t = s.section("timeouts", {"connect", "read", "total"})
    dt = TimeoutsConfig()
    timeouts = TimeoutsConfig(
        connect=t.number("connect", dt.connect, 0.001),
        read=t.number("read", dt.read, 0.001),
        total=t.number("total", dt.total, 0.001),
    )
    c = s.section("circuit_breaker", {"failures", "cooldown_seconds"})
    dc = CircuitBreakerConfig()
    breaker = CircuitBreakerConfig(
        failures=c.integer("failures", dc.failures, 1),
        cooldown_seconds=c.number("cooldown_seconds", dc.cooldown_seconds),
    )
    d = UpstreamConfig(name="", base_url="", api_key="")
    return UpstreamConfig(
        name=name or "",
        base_url=(base_url or "").rstrip("/"),
        api_key=api_key or "",
        models=s.globs("models", d.models),
        priority=s.integer("priority", d.priority, -1000000),
        weight=s.integer("weight", d.weight, 1),
        max_connections=s.integer("max_connections", d.max_connections, 1),
        max_concurrency=s.integer("max_concurrency", None, 1),
        timeouts=timeouts,
        circuit_breaker=breaker,
    )


def _parse_key(s: _Section) -> KeyConfig:
    name = s.text("name", "", required=True)
    if name and not _NAME.match(name):
        s.p.add(s.loc("name"), "must be 1-63 letters, digits, '_', '.', '-'")
    if name == "anonymous":
        s.p.add(s.loc("name"), "'anonymous' is reserved for unauthenticated callers")
    secret = s.text("key")
    digest = s.text("key_sha256")
    if secret is not None and digest is not None:
        s.p.add(s.where, "set either key or key_sha256, not both")
    elif secret is None and digest is None:
        s.p.add(s.where, "needs key or key_sha256")
    if secret is not None and len(secret) < 8:
        s.p.add(s.loc("key"), "must be at least 8 characters")
    if digest is not None and not _HEX64.match(digest):
        s.p.add(s.loc("key_sha256"), "must be 64 hex characters (see `dashscope-proxy hash-key`)")
    lim = s.section(
        "limits",
        {"requests_per_minute", "concurrent_requests", "images_per_day", "images_per_month"},
    )
    limits = LimitsConfig(
        requests_per_minute=lim.integer("requests_per_minute", None, 1),
        concurrent_requests=lim.integer("concurrent_requests", None, 1),
        images_per_day=lim.integer("images_per_day", None, 0),
        images_per_month=lim.integer("images_per_month", None, 0),
    )
    key_sha = sha256_hex(secret) if secret else (digest or "").lower()
    return KeyConfig(
        name=name or "", key_sha256=key_sha, models=s.globs("models", ("*",)), limits=limits
    )


def _parse_models(s: _Section, p: _Problems) -> dict[str, ModelOverride]:
    out: dict[str, ModelOverride] = {}
    for model, body in s.data.items():
        m = _Section(body, s.loc(str(model)), p, {"target", "mode", "async_only"})
        mode = m.text("mode")
        if mode is not None and mode not in ("sync", "async"):
            p.add(m.loc("mode"), f"must be sync or async, got {mode!r}")
            mode = None
        out[str(model)] = ModelOverride(
            target=m.text("target"), mode=mode, async_only=m.flag("async_only", False)
        )
    for model, o in out.items():
        if o.target is not None and o.target in out and out[o.target].target is not None:
            p.add(
                s.loc(model) + ".target", f"{o.target!r} is itself an alias; chains are not allowed"
            )
        problem = override_problem(model, o)
        if problem:
            p.add(s.loc(model), problem)
    return out


def _parse_state(s: _Section) -> StateConfig:
    d = StateConfig()
    backend = s.text("backend", d.backend)
    if backend not in ("local", "redis"):
        s.p.add(s.loc("backend"), f"must be local or redis, got {backend!r}")
    url = s.text("url")
    if backend == "redis" and not url:
        s.p.add(s.loc("url"), "is required with backend: redis")
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        s.p.add(s.loc("url"), "must be a redis:// , rediss:// or unix:// URL")
    return StateConfig(backend=backend, path=s.text("path", d.path), url=url)


def _parse_tasks(s: _Section) -> TasksConfig:
    d = TasksConfig()
    after = s.number("reconcile_after_seconds", d.reconcile_after_seconds, 0.01)
    most = s.number("reconcile_max_interval_seconds", d.reconcile_max_interval_seconds, 0.01)
    if most < after:
        s.p.add(
            s.loc("reconcile_max_interval_seconds"),
            f"must be at least reconcile_after_seconds ({after:g})",
        )
    return TasksConfig(
        reconcile_after_seconds=after,
        reconcile_max_interval_seconds=most,
        reconcile_polls_per_second=s.number(
            "reconcile_polls_per_second", d.reconcile_polls_per_second, 0.01
        ),
        reconcile_concurrency=s.integer("reconcile_concurrency", d.reconcile_concurrency, 1, 1000),
        reconcile=s.flag("reconcile", d.reconcile),
    )


def _parse_openai(s: _Section) -> OpenAIConfig:
    d = OpenAIConfig()
    fmt = s.text("default_response_format", d.default_response_format)
    if fmt not in ("b64_json", "url"):
        s.p.add(s.loc("default_response_format"), "must be b64_json or url")
    f = s.section("image_fetch", {"allowed_hosts", "max_bytes", "timeout_seconds"})
    df = ImageFetchConfig()
    fetch = ImageFetchConfig(
        allowed_hosts=f.globs("allowed_hosts", df.allowed_hosts),
        max_bytes=f.integer("max_bytes", df.max_bytes, 1),
        timeout_seconds=f.number("timeout_seconds", df.timeout_seconds, 0.001),
    )
    return OpenAIConfig(
        default_response_format=fmt,
        sync_wait_seconds=s.number("sync_wait_seconds", d.sync_wait_seconds, 0.001),
        task_retention_seconds=s.number("task_retention_seconds", d.task_retention_seconds, 1),
        image_fetch=fetch,
    )


def parse_config(text: str, environ: Mapping[str, str]) -> Config:
    """Parse and validate a YAML config. Raises ConfigError listing every problem."""
    p = _Problems()
    try:
        raw = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    raw = _interpolate(raw, "", environ, p)
    root = _Section(
        raw, "", p, {"server", "upstreams", "keys", "models", "state", "openai", "tasks"}
    )

    server = _parse_server(root.section("server", set(ServerConfig.__dataclass_fields__)))

    upstreams: list[UpstreamConfig] = []
    raw_upstreams = root.items("upstreams")
    if not raw_upstreams:
        p.add("upstreams", "at least one upstream is required")
    for i, item in enumerate(raw_upstreams):
        u = _parse_upstream(_Section(item, f"upstreams[{i}]", p, _UPSTREAM_FIELDS))
        if u is not None:
            upstreams.append(u)
    seen: dict[str, int] = {}
    for i, u in enumerate(upstreams):
        if u.name and u.name in seen:
            p.add(f"upstreams[{i}].name", f"duplicate of upstreams[{seen[u.name]}].name")
        seen.setdefault(u.name, i)

    keys: list[KeyConfig] = []
    raw_keys = root.items("keys")
    if not raw_keys:
        p.add("keys", "at least one key is required")
    for i, item in enumerate(raw_keys):
        keys.append(
            _parse_key(
                _Section(item, f"keys[{i}]", p, {"name", "key", "key_sha256", "models", "limits"})
            )
        )
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k.name and k.name in names:
            p.add(f"keys[{i}].name", f"duplicate of keys[{names[k.name]}].name")
        names.setdefault(k.name, i)
        if k.key_sha256 and k.key_sha256 in digests:
            p.add(f"keys[{i}]", f"same secret as keys[{digests[k.key_sha256]}]")
        digests.setdefault(k.key_sha256, i)
    upstream_keys = {u.api_key for u in upstreams}
    for i, k in enumerate(keys):
        if any(sha256_hex(uk) == k.key_sha256 for uk in upstream_keys if uk):
            p.add(f"keys[{i}]", "a client key must not equal an upstream api_key")

    models = _parse_models(root.section("models", set(root.data.get("models") or {})), p)
    state = _parse_state(root.section("state", {"backend", "path", "url"}))
    openai = _parse_openai(
        root.section(
            "openai",
            {
                "default_response_format",
                "sync_wait_seconds",
                "task_retention_seconds",
                "image_fetch",
            },
        )
    )
    tasks = _parse_tasks(root.section("tasks", set(TasksConfig.__dataclass_fields__)))
    if p.items:
        raise ConfigError(p.items)
    return Config(
        tasks=tasks,
        server=server,
        upstreams=tuple(upstreams),
        keys=tuple(keys),
        models=models,
        state=state,
        openai=openai,
    )


Signature = tuple[str, int, int, int, int]


def file_signature(path: str | os.PathLike[str]) -> Signature | None:
    """What identifies the file's current content without reading it; None if it cannot be stat'ed.

    The resolved path is part of it: after a ConfigMap's symlink swap the new
    target may even have the same inode number on another directory.
    """
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse a config file; `environ` defaults to the process environment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    return parse_config(text, os.environ if environ is None else environ)
