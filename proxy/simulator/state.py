"""Per-app state of the simulator and the typed keys it hangs under.

Everything mutable lives in one `SimState` stored at `app[STATE]`; per-request facts use
`web.RequestKey`s. Nothing here is module-level mutable state.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .faults import FaultQueue
from .png import PngCache
from .settings import SimSettings
from .signing import Signer, signed_image_url
from .tasks import TaskTable


@dataclass
class Stats:
    """Counters served at `GET /_sim/stats`."""

    requests: Counter[str] = field(default_factory=Counter)
    images_generated: int = 0
    tasks_created: int = 0
    faults_injected: int = 0
    uploads: int = 0


class UploadStore:
    """Files received by the simulated OSS upload host, by object key, oldest dropped first
    once their total size passes the limit."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._size = 0
        self._files: OrderedDict[str, tuple[bytes, str]] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        old = self._files.pop(key, None)
        if old is not None:
            self._size -= len(old[0])
        self._files[key] = (data, content_type)
        self._size += len(data)
        while self._size > self._limit and len(self._files) > 1:
            _, (dropped, _) = self._files.popitem(last=False)
            self._size -= len(dropped)

    def get(self, key: str) -> tuple[bytes, str] | None:
        return self._files.get(key)


# Signers retired by `POST /_sim/expire-images` that are still recognised, so that their URLs
# answer "expired" rather than "bad signature". Beyond this many, the oldest are forgotten
# (their URLs then fail the signature check: still a 403).
RETIRED_SIGNERS_KEPT = 1024


@dataclass
class SimState:
    settings: SimSettings
    signer: Signer  # upload policies
    image_signer: Signer  # result-image URLs; replaced by `expire_images`
    retired_image_signers: deque[Signer]
    tasks: TaskTable
    pngs: PngCache
    uploads: UploadStore
    faults: FaultQueue
    stats: Stats
    records: deque[dict[str, Any]]

    @classmethod
    def create(cls, settings: SimSettings) -> SimState:
        return cls(
            settings=settings,
            signer=Signer(),
            image_signer=Signer(),
            retired_image_signers=deque(maxlen=RETIRED_SIGNERS_KEPT),
            tasks=TaskTable(settings.task_ttl_seconds, settings.task_limit),
            pngs=PngCache(settings.image_side),
            uploads=UploadStore(settings.upload_limit_bytes),
            faults=FaultQueue(),
            stats=Stats(),
            records=deque(maxlen=max(settings.record_limit, 0)),
        )

    def image_urls(self, origin: str, names: tuple[str, ...], expires: int) -> list[str]:
        return [signed_image_url(self.image_signer, origin, name, expires) for name in names]

    def expire_images(self) -> None:
        """Make every image URL handed out so far answer as expired; later URLs are unaffected.

        Rotating the image signer does this without remembering any URL: old URLs carry the
        old signature, which only the retired signer accepts.
        """
        self.retired_image_signers.append(self.image_signer)
        self.image_signer = Signer()

    def url_expiry(self, start_wall: float | None = None) -> int:
        """Epoch second at which URLs made for a result finished at `start_wall` expire."""
        start = time.time() if start_wall is None else start_wall
        return int(start + self.settings.url_ttl_seconds)


STATE = web.AppKey("dashscope_sim_state", SimState)
REQUEST_ID = web.RequestKey("dashscope_sim_request_id", str)
STARTED = web.RequestKey("dashscope_sim_started", float)
STREAMING = web.RequestKey("dashscope_sim_streaming", bool)  # render errors as SSE frames
OWNER = web.RequestKey("dashscope_sim_owner", str)  # the caller's API key
