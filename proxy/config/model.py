"""The configuration's typed model: frozen dataclasses, one per section, with defaults.

Built only by `proxy.config.parse` (every problem reported at once); everything
else in the gateway reads these values and never the YAML.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from proxy.catalogue import family


class ConfigError(Exception):
    """A config that cannot be used. `problems` lists every one, each `location: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def sha256_hex(secret: str) -> str:
    """The `key_sha256` form of a bearer key."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


DEFAULT_USAGE_LOG = "./dashscope-proxy-usage.jsonl"


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
    # Seconds in-flight requests get to finish after SIGTERM; the whole drain
    # (waiting, then cutting what still runs) fits in it. Keep it, plus
    # final_scrape_seconds, below the pod's terminationGracePeriodSeconds.
    shutdown_grace_seconds: float = 30.0
    # A second listener for /metrics, /healthz and /readyz only. It stays open
    # through the drain, which closes the API port at once, so the images of
    # requests that finish during the drain still reach a scrape. None = those
    # endpoints are served on `port` only (and close with it at SIGTERM).
    metrics_port: int | None = None
    # After the drain, how long the metrics listener waits for one more scrape
    # when something was counted since the last one (it stops at the first
    # scrape). Set it to the scrape interval to never miss the last counts.
    final_scrape_seconds: float = 5.0
    # Worker processes sharing the port (SO_REUSEPORT); 1 = single process.
    workers: int = 1
    # One JSON line per request on stdout.
    access_log: bool = True
    # Whether access-log lines may hold the prompt (truncated). Off by default.
    log_prompts: bool = False
    # Append-only JSONL ledger of metered images, for chargeback: on by default, because
    # finance needs it and turning it on later cannot recover what was not written.
    # None (`usage_log: null`) = off.
    usage_log: str | None = DEFAULT_USAGE_LOG


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
    # In `pricing.currency`, per UTC day / month.
    spend_per_day: float | None = None
    spend_per_month: float | None = None


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
    # Managed Redis: the password apart from the URL (any characters, from a Secret via
    # ${VAR}; overrides one in the URL), and the CA that signed a `rediss://` server's
    # certificate when it is not a public one.
    password: str | None = None
    tls_ca_file: str | None = None
    # Redis Cluster (`url` names any node): every key under the hash tag `{dsp}:`.
    cluster: bool = False
    # Redis Sentinel instead of `url`: the sentinels (`host:port`), the master's name,
    # and the sentinels' own password when they require one (`password` is the master's).
    sentinels: tuple[str, ...] = ()
    sentinel_master: str | None = None
    sentinel_password: str | None = None


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
    # A metering claim left pending (its process died between claiming a task and
    # writing its count) is finished by any process after this long.
    pending_claim_seconds: float = 30.0


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
class PriceTier:
    """The price of an image of at most `max_pixels` (width x height)."""

    max_pixels: int
    per_image: float


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """The price of one generated image of models matching `pattern` (a glob).

    DashScope prices some models by output resolution (qwen-image-3.0-pro: 1K vs 2K), so
    `tiers` (in increasing `max_pixels`) are tried first against the delivered image's
    size; `per_image` applies above the last tier and when the size is unknown.
    """

    pattern: str
    per_image: float
    tiers: tuple[PriceTier, ...] = ()


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """`pricing:` what each delivered image costs. No built-in prices: DashScope's differ by
    region and change, so an unlisted model is unpriced (counted, cost unknown)."""

    currency: str = "USD"  # a label; amounts are plain numbers
    models: tuple[ModelPrice, ...] = ()  # first matching pattern wins


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """`storage:` durable copies of delivered images, handed out as the gateway's own links.

    `backend` is `local` (a directory, `path`) or `s3` (any S3-compatible store: `bucket`,
    `endpoint_url` (omit for AWS), `region`, the access key pair, and an object-name
    `prefix`). `signing_key` is the HMAC key of the gateway's image links; with
    `public_base_url` links are that URL + the object name instead (a CDN or public bucket).
    """

    backend: str = "local"
    path: str = "./dashscope-proxy-images"
    bucket: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    prefix: str = ""
    signing_key: str = field(default="", repr=False)
    public_base_url: str | None = None
    link_ttl_seconds: float = 604800.0
    retention_days: float = 30.0
    max_image_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """`idempotency:` how requests carrying an `Idempotency-Key` are answered once.

    A kept answer lives `ttl_seconds` after it was written. Answers larger than
    `max_answer_bytes` are not kept (a repeat is told so, and never run again).
    `lease_seconds` is how long a claim counts as running with no answer before a repeat
    is told that the outcome is unknown; None: the longest a request can run (the longest
    upstream `timeouts.total`, plus `openai.sync_wait_seconds`, plus a minute).
    """

    ttl_seconds: float = 86400.0
    max_answer_bytes: int = 16 * 1024 * 1024
    lease_seconds: float | None = None


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
    pricing: PricingConfig = PricingConfig()
    storage: StorageConfig | None = None  # None: image URLs are DashScope's own
    idempotency: IdempotencyConfig = IdempotencyConfig()

    @property
    def idempotency_lease(self) -> float:
        """Seconds a claim runs before its outcome counts as unknown (see IdempotencyConfig)."""
        if self.idempotency.lease_seconds is not None:
            return self.idempotency.lease_seconds
        longest = max((u.timeouts.total for u in self.upstreams), default=0.0)
        return longest + self.openai.sync_wait_seconds + 60.0

    def upstreams_for(self, model: str) -> tuple[UpstreamConfig, ...]:
        """Upstreams serving `model`, in config order."""
        return tuple(u for u in self.upstreams if u.serves(model))
