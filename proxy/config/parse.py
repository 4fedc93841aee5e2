"""Parsing the configuration: YAML -> `proxy.config.model`, every problem at once.

Parsing is a pure function of (text, environ): `parse_config(text, environ)`
returns a `Config` or raises `ConfigError` carrying *every* problem found, each
with its location (`keys[2].key_sha256: must be 64 hex characters`). Unknown
fields are errors, because typos are the commonest config bug.

Deliberately not here: reading the environment for anything but `${VAR}`
interpolation, and any I/O except `load_config(path)` reading one file and
`file_signature(path)` stat-ing it (what proxy.ops.reload watches).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from proxy.catalogue import override_problem
from proxy.config.idempotency import FIELDS as IDEMPOTENCY_FIELDS
from proxy.config.idempotency import parse_idempotency
from proxy.config.model import (
    DEFAULT_USAGE_LOG,
    CircuitBreakerConfig,
    Config,
    ConfigError,
    ImageFetchConfig,
    KeyConfig,
    LimitsConfig,
    ModelOverride,
    OpenAIConfig,
    ServerConfig,
    StateConfig,
    TasksConfig,
    TimeoutsConfig,
    UpstreamConfig,
    sha256_hex,
)
from proxy.config.pricing import parse_pricing
from proxy.config.sections import Problems, Section, interpolate
from proxy.config.state import parse_state
from proxy.config.storage import FIELDS as STORAGE_FIELDS
from proxy.config.storage import parse_storage

# libyaml's safe loader when PyYAML has it: ~10x faster on a config with a
# thousand keys, which a reload parses while the gateway serves.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _parse_server(s: Section) -> ServerConfig:
    d = ServerConfig()
    usage_log = s.text_or_off("usage_log", DEFAULT_USAGE_LOG)
    port = s.integer("port", d.port, 0, 65535)
    workers = s.integer("workers", d.workers, 1, 256)
    metrics_port = s.integer("metrics_port", None, 0, 65535)
    if metrics_port is not None and metrics_port == port and port != 0:
        s.p.add(s.loc("metrics_port"), f"must differ from port ({port})")
    if metrics_port == 0 and workers > 1:
        # Each worker would bind its own random port: Prometheus could not find them.
        s.p.add(s.loc("metrics_port"), "must be a fixed port (not 0) with workers > 1")
    return ServerConfig(
        host=s.text("host", d.host),
        port=port,
        max_body_bytes=s.integer("max_body_bytes", d.max_body_bytes, 1024),
        backlog=s.integer("backlog", d.backlog, 1),
        shutdown_grace_seconds=s.number("shutdown_grace_seconds", d.shutdown_grace_seconds),
        metrics_port=metrics_port,
        final_scrape_seconds=s.number("final_scrape_seconds", d.final_scrape_seconds),
        workers=workers,
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


def _parse_upstream(s: Section) -> UpstreamConfig | None:
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


def _parse_key(s: Section) -> KeyConfig:
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
        set(LimitsConfig.__dataclass_fields__),
    )
    limits = LimitsConfig(
        requests_per_minute=lim.integer("requests_per_minute", None, 1),
        concurrent_requests=lim.integer("concurrent_requests", None, 1),
        images_per_day=lim.integer("images_per_day", None, 0),
        images_per_month=lim.integer("images_per_month", None, 0),
        spend_per_day=lim.optional_number("spend_per_day"),
        spend_per_month=lim.optional_number("spend_per_month"),
    )
    key_sha = sha256_hex(secret) if secret else (digest or "").lower()
    return KeyConfig(
        name=name or "", key_sha256=key_sha, models=s.globs("models", ("*",)), limits=limits
    )


def _parse_models(s: Section, p: Problems) -> dict[str, ModelOverride]:
    out: dict[str, ModelOverride] = {}
    for model, body in s.data.items():
        m = Section(body, s.loc(str(model)), p, {"target", "mode", "async_only"})
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


def _parse_tasks(s: Section) -> TasksConfig:
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
        pending_claim_seconds=s.number("pending_claim_seconds", d.pending_claim_seconds, 0.1),
    )


def _parse_openai(s: Section) -> OpenAIConfig:
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
    p = Problems()
    try:
        raw = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    raw = interpolate(raw, "", environ, p)
    root = Section(
        raw,
        "",
        p,
        {"server", "upstreams", "keys", "models", "state", "openai", "tasks", "pricing"}
        | {"idempotency", "storage"},
    )

    server = _parse_server(root.section("server", set(ServerConfig.__dataclass_fields__)))

    upstreams: list[UpstreamConfig] = []
    raw_upstreams = root.items("upstreams")
    if not raw_upstreams:
        p.add("upstreams", "at least one upstream is required")
    for i, item in enumerate(raw_upstreams):
        u = _parse_upstream(Section(item, f"upstreams[{i}]", p, _UPSTREAM_FIELDS))
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
                Section(item, f"keys[{i}]", p, {"name", "key", "key_sha256", "models", "limits"})
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
    state = parse_state(root.section("state", set(StateConfig.__dataclass_fields__)))
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
    pricing = parse_pricing(root.section("pricing", {"currency", "models"}))
    idempotency = parse_idempotency(root.section("idempotency", IDEMPOTENCY_FIELDS), upstreams)
    storage = (
        parse_storage(root.section("storage", STORAGE_FIELDS))
        if root.data.get("storage") is not None
        else None
    )
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
        pricing=pricing,
        idempotency=idempotency,
        storage=storage,
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


def usage_log_setting(path: str | os.PathLike[str], environ: Mapping[str, str]) -> str | None:
    """Only `server.usage_log` of a config file (default when absent, None when `null`).

    For `dashscope-proxy usage`, which finance may run without the secrets the rest of
    the file interpolates (`${DASHSCOPE_API_KEY}`): only this value's `${VAR}`s must be set.
    """
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_YAML_LOADER)  # noqa: S506
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        raise ConfigError([f"{path}: {where}: not valid YAML"]) from None
    p = Problems()
    server = raw.get("server") if isinstance(raw, dict) else None
    data = (
        {"usage_log": server["usage_log"]}
        if isinstance(server, dict) and "usage_log" in server
        else {}
    )
    section = Section(interpolate(data, "server", environ, p), "server", p, {"usage_log"})
    value = section.text_or_off("usage_log", DEFAULT_USAGE_LOG)
    if p.items:
        raise ConfigError(p.items)
    return value


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse a config file; `environ` defaults to the process environment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    return parse_config(text, os.environ if environ is None else environ)
