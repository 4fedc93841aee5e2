"""Calling DashScope: the shared ClientSession, upstream choice, header filters, error mapping.

Foreign errors are translated at this one boundary (as httpx's
`map_httpcore_exceptions` does): aiohttp's client exceptions become
`UpstreamFailure` with a short, closed-set `kind` used as the metric label and
in the DashScope-shaped 502/504 the client sees. No exception text from aiohttp
reaches a client, because it can contain the upstream URL.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Iterable, Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.catalogue import is_dashscope_model
from proxy.config.memo import per_config
from proxy.config.model import Config, TimeoutsConfig, UpstreamConfig
from proxy.errors import GatewayError, no_upstream, upstream_timeout, upstream_unavailable
from proxy.jsonutil import loads
from proxy.metrics import Metrics

# RFC 9110 7.6.1 hop-by-hop headers, plus what the gateway rewrites itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers never forwarded upstream:
# - authorization: the client's gateway key; replaced by the upstream key.
# - host, content-length: recomputed by aiohttp for the new request.
# - accept-encoding: we ask DashScope for identity so metering can read the
#   bytes and they pass to the client unchanged (no decompress/recompress).
# - cookie, x-forwarded-*: nothing of the client's network leaks to DashScope.
_DROP_REQUEST = HOP_BY_HOP | {
    "authorization",
    "host",
    "content-length",
    "accept-encoding",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "expect",
}
# Response headers not relayed: hop-by-hop, and the framing headers aiohttp
# writes itself for the response it sends (length or chunking).
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie"}


def request_headers(incoming: Mapping[str, str], api_key: str) -> CIMultiDict[str]:
    """Pure: the headers to send upstream for a client request."""
    drop = _DROP_REQUEST
    conn = incoming.get("Connection")
    if conn:
        drop = drop | {h.strip().lower() for h in conn.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out["Authorization"] = _bearer(api_key)
    out["Accept-Encoding"] = "identity"
    return out


class Forwarded:
    """The headers of a client request as sent to whichever upstream takes it (with that
    upstream's key): the header builder of `call_with_failover` for a passthrough, one
    small object per request rather than a closure and its cell."""

    __slots__ = ("incoming",)

    def __init__(self, incoming: Mapping[str, str]) -> None:
        self.incoming = incoming

    def __call__(self, upstream: UpstreamConfig) -> CIMultiDict[str]:
        return request_headers(self.incoming, upstream.api_key)


@functools.lru_cache(maxsize=256)
def _bearer(api_key: str) -> str:
    # One string per upstream key, not one more kept by every request in flight.
    return f"Bearer {api_key}"


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Pure: the upstream response headers relayed to the client."""
    drop = _DROP_RESPONSE
    conn = upstream.get("Connection")
    if conn:
        drop = drop | {h.strip().lower() for h in conn.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


class UpstreamFailure(GatewayError):
    """A transport failure talking to DashScope. `kind` is a closed-set metric label."""

    kind: str

    @classmethod
    def of(cls, kind: str, err: GatewayError) -> UpstreamFailure:
        f = cls(err.status, err.code, err.message, err.openai_type, err.openai_code)
        f.kind = kind
        return f


def map_client_error(exc: BaseException) -> UpstreamFailure:
    """Translate an aiohttp/asyncio exception raised before any byte reached the client."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # No connection was made, so nothing was sent: safe to try another upstream.
        return UpstreamFailure.of("connect_timeout", upstream_timeout())
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure.of("timeout", upstream_timeout())
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure.of("connect", upstream_unavailable("connection refused or failed"))
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamFailure.of(
            "disconnected", upstream_unavailable("the connection closed unexpectedly")
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure.of("truncated", upstream_unavailable("the response was truncated"))
    return UpstreamFailure.of("transport", upstream_unavailable("transport error"))


def client_timeout(upstream: UpstreamConfig) -> aiohttp.ClientTimeout:
    return _client_timeout(upstream.timeouts)


@per_config
def _client_timeout(t: TimeoutsConfig) -> aiohttp.ClientTimeout:
    # One (immutable) ClientTimeout per upstream's setting, not one kept by every request
    # (and no hash of the setting per request, as an lru_cache would make).
    return aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.read)


def connect_timeout(upstream: UpstreamConfig) -> aiohttp.ClientTimeout:
    """`client_timeout` with only `timeouts.connect`, for a call whose `read` and `total`
    the app's `Deadlines` keeps (proxy.upstream.deadline)."""
    return _connect_timeout(upstream.timeouts)


@per_config
def _connect_timeout(t: TimeoutsConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=t.connect, sock_read=None)


def make_session(upstreams: Iterable[UpstreamConfig]) -> aiohttp.ClientSession:
    """The one ClientSession of the app.

    aiohttp's default connector caps a session at 100 connections, which would
    queue the 101st concurrent image request behind minutes-long calls; the
    gateway instead caps per upstream (`max_connections`) and not globally.
    DNS answers are cached for 5 minutes; keep-alive connections are reused.
    """
    per_host = max((u.max_connections for u in upstreams), default=10000)
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=per_host,
        ttl_dns_cache=300,
        keepalive_timeout=30,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Bodies pass through as bytes; never decompress or re-encode them.
        auto_decompress=False,
        # No cookie jar: cookies from one caller's upstream answer must never
        # be sent on another caller's request.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


class UpstreamRouter:
    """Chooses the upstream for a model: first configured upstream whose globs match.

    Results are cached per model name (bounded), so the glob match runs once
    per distinct model, not per request.
    """

    _CACHE_MAX = 1024

    def __init__(self, config: Config) -> None:
        self._config = config
        self._by_name = {u.name: u for u in config.upstreams}
        self._cache: dict[str, tuple[UpstreamConfig, ...]] = {}
        self._known: dict[str, bool] = {}
        self._patterns = tuple(p for u in config.upstreams for p in u.models)

    def candidates(self, model: str) -> tuple[UpstreamConfig, ...]:
        hit = self._cache.get(model)
        if hit is None:
            # Lower priority value first; config order among equals.
            hit = tuple(sorted(self._config.upstreams_for(model), key=lambda u: u.priority))
            if len(self._cache) < self._CACHE_MAX:
                self._cache[model] = hit
        return hit

    def knows(self, model: str) -> bool:
        """Is `model` a DashScope model as far as this config knows (the catalogue, the
        `models:` section, or an upstream's explicit pattern)? See
        `model_table.is_dashscope_model`."""
        hit = self._known.get(model)
        if hit is None:
            hit = is_dashscope_model(model, self._config.models, self._patterns)
            if len(self._known) < self._CACHE_MAX:
                self._known[model] = hit
        return hit

    def choose(self, model: str) -> UpstreamConfig:
        found = self.candidates(model)
        if not found:
            raise no_upstream(model)
        return found[0]

    def by_name(self, name: str) -> UpstreamConfig | None:
        return self._by_name.get(name)


def upstream_url(upstream: UpstreamConfig, path: str) -> URL | str:
    """`upstream.base_url` + `path`, parsed once per (base URL, path): generation requests
    name a handful of paths, and a URL string made per request is parsed again and kept
    by every request in flight. One that does not parse is left to aiohttp, which
    reports it as the transport failure it always was."""
    try:
        return _url(upstream.base_url, path)
    except ValueError:
        return upstream.base_url + path


@functools.lru_cache(maxsize=1024)
def _url(base_url: str, path: str) -> URL:
    return URL(base_url + path)


def send_upstream(
    session: aiohttp.ClientSession,
    upstream: UpstreamConfig,
    method: str,
    url: str | URL,
    headers: CIMultiDict[str],
    body: bytes | None,
    params: object = None,
    timeout: aiohttp.ClientTimeout | None = None,
) -> Awaitable[aiohttp.ClientResponse]:
    """The request to `upstream`, to await: its response, or aiohttp's `ClientError` /
    `TimeoutError` (give those to `upstream_failure`). Awaited where it is needed, so a
    request waiting on DashScope holds no coroutine of ours for it. `timeout`: the
    upstream's `client_timeout` unless the caller keeps `read` and `total` itself."""
    return session.request(
        method,
        url,
        data=body,
        headers=headers,
        params=params,  # type: ignore[arg-type]
        timeout=client_timeout(upstream) if timeout is None else timeout,
        allow_redirects=False,
    )


def upstream_failure(
    metrics: Metrics, upstream: UpstreamConfig, exc: aiohttp.ClientError | TimeoutError
) -> UpstreamFailure:
    """A transport failure of `send_upstream`, counted, as the error to raise (502/504)."""
    failure = map_client_error(exc)
    metrics.upstream_errors.labels(upstream.name, failure.kind).inc()
    return failure


async def call_upstream(
    session: aiohttp.ClientSession,
    metrics: Metrics,
    upstream: UpstreamConfig,
    endpoint: str,
    method: str,
    url: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    params: object = None,
) -> aiohttp.ClientResponse:
    """Send one request upstream; transport failures raise `UpstreamFailure` (502/504)."""
    t0 = time.perf_counter()
    try:
        resp = await send_upstream(session, upstream, method, url, headers, body, params)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise upstream_failure(metrics, upstream, exc) from None
    metrics.upstream_timer(upstream.name, endpoint).observe(time.perf_counter() - t0)
    return resp


# How much of an error body is read to learn its code (DashScope's are a few hundred bytes).
PEEK_LIMIT = 64 * 1024


async def peek_error(resp: aiohttp.ClientResponse) -> tuple[str | None, str | None]:
    """DashScope's `code` and `message` of a small JSON error answer (None, None when it is
    not one). aiohttp keeps what `read()` read, so relaying the answer afterwards still
    sends the whole body."""
    length = resp.content_length
    if length is None or length > PEEK_LIMIT or "event-stream" in resp.content_type:
        return None, None
    try:
        obj = loads(await resp.read())
    except (ValueError, RecursionError, aiohttp.ClientError, TimeoutError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    code, message = obj.get("code"), obj.get("message")
    return (
        code[:64] if isinstance(code, str) and code else None,
        message if isinstance(message, str) else None,
    )


def rejects_key(status: int, code: str | None, message: str | None) -> bool:
    """Pure: does this answer say DashScope refused the gateway's own upstream key?
    401 (`InvalidApiKey`), or 403 `AccessDenied` for the whole account ("Access denied.");
    not a model the account has not bought, nor an endpoint's mode."""
    if status == 401:
        return True
    return status == 403 and code == "AccessDenied" and (message or "").strip() == "Access denied."


def key_headers(api_key: str) -> CIMultiDict[str]:
    """Headers of a request the gateway makes by itself (a background poll, a key probe):
    the upstream's key, a JSON answer, uncompressed (metering reads the bytes)."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Authorization"] = _bearer(api_key)
    headers["Accept"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    return headers


async def peek_throttling(resp: aiohttp.ClientResponse) -> tuple[bool, str]:
    """Is this 429 DashScope's `Throttling*`, and its code? A body that cannot be read as
    a small JSON error is assumed to be: every 429 DashScope documents is `Throttling*`."""
    code, _ = await peek_error(resp)
    return (True, "429") if code is None else (code.startswith("Throttling"), code)


def counts_as_failure(status: int) -> bool:
    """Does this answer count against the upstream's circuit breaker?"""
    return status == 429 or status >= 500
