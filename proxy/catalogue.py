"""The built-in routing table: how DashScope runs each image model, and what it accepts.

Pure data and pure functions, no I/O. For every model family: the DashScope
endpoint(s) it can be called on (sync multimodal-generation, the async task
endpoints), the mode the gateway uses by default, whether it takes input
images (edit mode), and the limits DashScope enforces (sizes, `n`, prompt
length), so the front ends can refuse what DashScope would refuse before
spending an upstream call, in words a user can act on.

The config's `models:` section overrides it per model name: `target` (an
alias: `gpt-image-1 -> qwen-image-2.0-pro`), `mode` (`sync` | `async`:
DashScope differs by region) and `async_only` (the OpenAI endpoint answers
with a task object). `resolve()` applies them.

Sources: DashScope's model pages. Dated
snapshots (`qwen-image-2.0-pro-2026-03-03`) share their family's entry. A
model not in the table is still routed (DashScope may have added it): as a
messages-format model on the sync multimodal endpoint, with no local checks.

Deliberately not here: which upstream serves a model (`upstream.py`) and
whether a key may use it (`auth.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Protocol


class Override(Protocol):
    """A `models:` entry of the config (`config.ModelOverride`; not imported: config
    validates overrides with `override_problem`, so it imports this module)."""

    @property
    def target(self) -> str | None: ...
    @property
    def mode(self) -> str | None: ...
    @property
    def async_only(self) -> bool: ...


class Endpoint(StrEnum):
    """DashScope generation endpoints (their paths: `SERVICE_PATHS`)."""

    MULTIMODAL = "multimodal-generation"  # sync (JSON or SSE)
    IMAGE_GENERATION = "image-generation"  # async submit, messages body
    TEXT2IMAGE = "text2image"  # async submit (sync without the async header), prompt body
    IMAGE2IMAGE = "image2image"  # async submit, prompt + images body


# Where each endpoint lives under an upstream's `base_url` (`.../api/v1`).
SERVICE_PATHS = {
    Endpoint.MULTIMODAL.value: "/services/aigc/multimodal-generation/generation",
    Endpoint.IMAGE_GENERATION.value: "/services/aigc/image-generation/generation",
    Endpoint.TEXT2IMAGE.value: "/services/aigc/text2image/image-synthesis",
    Endpoint.IMAGE2IMAGE.value: "/services/aigc/image2image/image-synthesis",
}


class BodyShape(StrEnum):
    """Where the prompt goes in the DashScope request body (it depends on the endpoint)."""

    MESSAGES = "messages"  # input.messages[0].content = [{"text"}, {"image"}...]
    PROMPT = "prompt"  # input.prompt (+ input.images)


def shape_of(endpoint: Endpoint) -> BodyShape:
    """multimodal-generation and image-generation take messages; the synthesis endpoints a
    prompt."""
    if endpoint in (Endpoint.MULTIMODAL, Endpoint.IMAGE_GENERATION):
        return BodyShape.MESSAGES
    return BodyShape.PROMPT


@dataclass(frozen=True, slots=True)
class SizeRule:
    """Which `W*H` sizes DashScope accepts for a model.

    kind: `pixels` (W*H within [low, high]), `sides` (each side within
    [low, high]), `fixed` (one of `fixed`), `any` (not checked).
    """

    kind: str
    low: int = 0
    high: int = 0
    fixed: tuple[tuple[int, int], ...] = ()
    max_aspect: float = 0.0  # 4.0: between 1:4 and 4:1; 0: unchecked
    multiple: int = 1
    presets: tuple[str, ...] = ()  # named sizes DashScope accepts as is ("1K", "2K")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model family as DashScope runs it."""

    family: str
    sync: Endpoint | None  # the sync endpoint, if DashScope offers one
    async_: Endpoint | None  # the async (task) endpoint, if any
    prompt_limit: int | None  # characters; None: not checked
    size: SizeRule
    n_max: int | None  # None: not checked
    images_min: int = 0  # input images (edit mode)
    images_max: int = 0
    prefer_async: bool = False  # has a sync form, but DashScope documents it as a task

    @property
    def default_mode(self) -> str:
        return "sync" if self.sync is not None and not self.prefer_async else "async"

    @property
    def edits(self) -> bool:
        return self.images_max > 0

    def endpoint(self, mode: str) -> Endpoint:
        chosen = self.sync if mode == "sync" else self.async_
        if chosen is None:  # excluded by config validation; kept total for safety
            chosen = self.sync or self.async_
        assert chosen is not None
        return chosen


QWEN_FIXED = ((1664, 928), (1472, 1104), (1328, 1328), (1104, 1472), (928, 1664))
_E1, _E2, _E3, _E4 = (
    Endpoint.MULTIMODAL,
    Endpoint.IMAGE_GENERATION,
    Endpoint.TEXT2IMAGE,
    Endpoint.IMAGE2IMAGE,
)

_QWEN2 = ModelSpec("qwen-image-2.0", _E1, None, 800, SizeRule("pixels", 512 * 512, 2048 * 2048), 6)
# The newer qwen-image-max page allows custom sizes in the 2.0 range (the five
# fixed sizes all fall inside it); the older one only the fixed sizes.
_QWEN_MAX = ModelSpec(
    "qwen-image-max", _E1, None, 800, SizeRule("pixels", 512 * 512, 2048 * 2048), 1
)
_QWEN_PLUS = ModelSpec("qwen-image-plus", _E1, _E3, 800, SizeRule("fixed", fixed=QWEN_FIXED), 1)
_QWEN_EDIT = ModelSpec(
    "qwen-image-edit", _E1, None, 800, SizeRule("sides", 512, 2048), 1, images_min=1, images_max=3
)
_QWEN_EDIT_PLUS = ModelSpec(
    "qwen-image-edit", _E1, None, 800, SizeRule("sides", 512, 2048), 6, images_min=1, images_max=3
)
_WAN26_T2I = ModelSpec(
    "wan2.6-t2i", _E1, _E2, 2100, SizeRule("pixels", 1280 * 1280, 1440 * 1440, max_aspect=4.0), 4
)
_WAN26_IMAGE = ModelSpec(
    "wan2.6-image",
    _E1,
    _E2,
    2000,
    SizeRule("pixels", 768 * 768, 2048 * 2048, max_aspect=4.0, multiple=16, presets=("1K", "2K")),
    4,
    images_min=1,
    images_max=4,
)
_WAN25_T2I = ModelSpec(
    "wan2.5-t2i", None, _E3, 2000, SizeRule("pixels", 1280 * 1280, 1440 * 1440, max_aspect=4.0), 4
)
# wan2.2 flash/plus also answer E3 without the async header (`ImageSynthesis.sync_call`).
_WAN22_SYNCABLE = ModelSpec(
    "wan2.2-t2i", _E3, _E3, 500, SizeRule("sides", 512, 1440), 4, prefer_async=True
)
_WAN21_T2I = ModelSpec("wan2.1-t2i", None, _E3, 500, SizeRule("sides", 512, 1440), 4)
_WANX_V1 = ModelSpec(
    "wanx-v1",
    None,
    _E3,
    500,
    SizeRule("fixed", fixed=((1024, 1024), (720, 1280), (1280, 720), (768, 1152))),
    4,
)
_WAN25_I2I = ModelSpec(
    "wan2.5-i2i",
    None,
    _E4,
    2000,
    SizeRule("pixels", 768 * 768, 1280 * 1280, max_aspect=4.0),
    4,
    images_min=1,
    images_max=3,
)
# 2026 additions. qwen-image-3.0: text-to-image and editing (0-3 input images), usage
# `output_image_count`; its prompt limit is undocumented, so it is not checked here.
_QWEN3 = ModelSpec(
    "qwen-image-3.0",
    _E1,
    None,
    None,
    SizeRule("pixels", 512 * 512, 2048 * 2048),
    6,
    images_min=0,
    images_max=3,
)
# z-image-turbo: a qwen-style sync text-to-image model; its limits are not
# documented well enough to refuse anything locally.
_Z_IMAGE = ModelSpec("z-image-turbo", _E1, None, None, SizeRule("any"), None)
# wan2.7-image: like wan2.6-image, but text-to-image too (0-4 reference images).
_WAN27_IMAGE = ModelSpec(
    "wan2.7-image",
    _E1,
    _E2,
    None,
    SizeRule("any", presets=("1K", "2K")),
    4,
    images_min=0,
    images_max=4,
)
# Unknown models: routed like the current generation (messages on the sync
# endpoint, or the messages task endpoint with mode: async), never checked here.
UNKNOWN = ModelSpec("unknown", _E1, _E2, None, SizeRule("any"), None, 0, 16)

TABLE: Mapping[str, ModelSpec] = {
    "qwen-image-2.0-pro": _QWEN2,
    "qwen-image-2.0": _QWEN2,
    "qwen-image-max": _QWEN_MAX,
    "qwen-image-plus": _QWEN_PLUS,
    "qwen-image": _QWEN_PLUS,
    "qwen-image-edit": _QWEN_EDIT,
    "qwen-image-edit-plus": _QWEN_EDIT_PLUS,
    "qwen-image-edit-max": _QWEN_EDIT_PLUS,
    "wan2.6-t2i": _WAN26_T2I,
    "wan2.6-image": _WAN26_IMAGE,
    "wan2.5-t2i-preview": _WAN25_T2I,
    "wan2.2-t2i-flash": _WAN22_SYNCABLE,
    "wan2.2-t2i-plus": _WAN22_SYNCABLE,
    "wanx2.1-t2i-turbo": _WAN21_T2I,
    "wanx2.1-t2i-plus": _WAN21_T2I,
    "wanx-v1": _WANX_V1,
    "wan2.5-i2i-preview": _WAN25_I2I,
    "qwen-image-3.0": _QWEN3,
    "qwen-image-3.0-pro": _QWEN3,
    "z-image-turbo": _Z_IMAGE,
    "wan2.7-image": _WAN27_IMAGE,
    "wan2.7-image-pro": _WAN27_IMAGE,
}

# A dated snapshot: `<family>-YYYY-MM-DD` or `<family>-MMDD`.
_SNAPSHOT = re.compile(r"^(.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


def family(model: str) -> str:
    """The catalogue name `model` behaves as: itself, or the family of its dated snapshot
    (`qwen-image-2.0-pro-2026-04-22` -> `qwen-image-2.0-pro`). Unknown names map to
    themselves."""
    if model in TABLE:
        return model
    m = _SNAPSHOT.match(model)
    if m and m.group(1) in TABLE:
        return m.group(1)
    return model


def lookup(model: str) -> ModelSpec | None:
    """The table entry of `model` or of the family of its dated snapshot; None if unknown."""
    return TABLE.get(family(model))


def is_dashscope_model(
    model: str, overrides: Mapping[str, Override], upstream_patterns: Iterable[str]
) -> bool:
    """Does the gateway know `model` as a DashScope model? In the built-in catalogue
    (dated snapshots included), named in the config's `models:` section, or matched by
    an upstream's explicit `models` pattern (anything but the catch-all `*`). The
    OpenAI and `/aliyun/v1` front ends refuse other names (`gpt-image-1`, `dall-e-3`)
    before any upstream call; `/api/v1` passes every name through."""
    if lookup(model) is not None or model in overrides:
        return True
    return any(p != "*" and fnmatchcase(model, p) for p in upstream_patterns)


def edit_models() -> list[str]:
    """The models that take input images through the messages body (edit mode)."""
    return [name for name, spec in TABLE.items() if spec.edits and spec.sync is Endpoint.MULTIMODAL]


@dataclass(frozen=True, slots=True)
class Route:
    """How the gateway calls DashScope for a model the client asked for."""

    requested: str  # what the client asked for: metering and allowlists use this
    target: str  # what DashScope is asked for (an alias resolved)
    spec: ModelSpec
    known: bool  # in the table (checked locally) or not
    mode: str  # "sync" | "async": how the gateway calls DashScope
    async_only: bool  # /v1/images/generations answers a task object

    @property
    def endpoint(self) -> Endpoint:
        return self.spec.endpoint(self.mode)

    @property
    def shape(self) -> BodyShape:
        return shape_of(self.endpoint)


def resolve(model: str, overrides: Mapping[str, Override]) -> Route:
    """Apply the config's overrides to the table: alias first, then the target's own entry."""
    own = overrides.get(model)
    target = own.target if own is not None and own.target else model
    of_target = overrides.get(target) if target != model else None
    spec = lookup(target)
    known = spec is not None
    if spec is None:
        spec = UNKNOWN
    async_only = bool((own and own.async_only) or (of_target and of_target.async_only))
    mode = (
        (own.mode if own else None) or (of_target.mode if of_target else None) or spec.default_mode
    )
    if async_only:
        mode = "async"  # the task object needs a DashScope task
    if (spec.sync if mode == "sync" else spec.async_) is None:
        mode = spec.default_mode  # excluded by config validation; kept total for safety
        async_only = async_only and mode == "async"
    return Route(model, target, spec, known, mode, async_only)


def override_problem(model: str, override: Override) -> str | None:
    """Why a `models:` entry cannot work (for config validation), or None."""
    spec = lookup(override.target or model)
    if spec is None:
        return None
    if override.async_only and override.mode == "sync":
        return "async_only: true needs DashScope's async task endpoint; drop mode: sync"
    if override.async_only and spec.async_ is None:
        return (
            f"{override.target or model} runs only synchronously on DashScope, so it "
            "cannot answer with a task object; drop async_only"
        )
    if override.mode is None:
        return None
    if override.mode == "sync" and spec.sync is None:
        return (
            f"{override.target or model} runs only as an async task on DashScope; "
            "use mode: async (or async_only: true)"
        )
    if override.mode == "async" and spec.async_ is None:
        return (
            f"{override.target or model} runs only synchronously on DashScope "
            "(it answers 403 'current user api does not support asynchronous calls'); "
            "use mode: sync"
        )
    return None
