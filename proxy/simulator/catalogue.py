"""The simulated model catalogue: which models exist, where they may be called, their limits.

Pure data (DashScope's per-model limits) plus one pure rule: a dated snapshot
(`<family>-YYYY-MM-DD` or `<family>-MMDD`) behaves exactly as its family, so snapshots are not
listed. `models.py` validates requests against it. Where the sources disagree the choice is
noted next to the entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType


class Endpoint(StrEnum):
    """The generation endpoints, named by their task segment in the URL."""

    MULTIMODAL = "multimodal-generation"  # E1, sync (JSON or SSE)
    IMAGE_GENERATION = "image-generation"  # E2, async submit
    TEXT2IMAGE = "text2image"  # E3, async submit (sync without the async header)
    IMAGE2IMAGE = "image2image"  # E4, async submit


class Family(StrEnum):
    """Request and response shape of a model."""

    QWEN = "qwen"  # qwen-image text-to-image: one text; usage {image_count,width,height}
    QWEN_EDIT = "qwen-edit"  # qwen-image-edit*: 1-3 images + one text, E1 only
    # qwen-image-3.0*: qwen answer, usage {output_image_count, input_image_count, output_*}
    QWEN3 = "qwen3"
    WAN26_T2I = "wan2.6-t2i"  # wan2.6 shape: `type`, `finished`, token usage
    WAN26_IMAGE = "wan2.6-image"  # edit mode or interleaved text+image
    SYNTHESIS = "synthesis"  # E3 input.prompt -> results[] + task_metrics
    I2I = "i2i"  # wan2.5-i2i-preview: E4 input.prompt + input.images
    IMAGEEDIT = "imageedit"  # wanx2.1-imageedit: E4 input.function + base_image_url


@dataclass(frozen=True)
class SizeRule:
    """Which `W*H` sizes a model accepts.

    kind: `pixels` (total pixels in [low, high]), `sides` (each side in [low, high]),
    `fixed` (only `fixed`), `any` (not checked: the output follows the input image).
    Sizes listed in `fixed` are always accepted: the wan docs recommend sizes such as
    1696*960 that fall just below their own stated pixel minimum.
    """

    kind: str
    low: int = 0
    high: int = 0
    fixed: tuple[tuple[int, int], ...] = ()
    max_aspect: float = 0.0  # 0: unchecked; 4.0 means between 1:4 and 4:1
    multiple: int = 1
    presets: tuple[tuple[str, tuple[int, int]], ...] = ()  # e.g. ("1K", (1280, 1280))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    endpoints: frozenset[Endpoint]
    prompt_limit: int
    size: SizeRule
    default_size: tuple[int, int]
    n_max: int
    n_default: int
    sync_synthesis: bool = False  # E3 without the async header (`ImageSynthesis.sync_call`)
    images_min: int = 0
    images_max: int = 0
    styles: frozenset[str] = field(default_factory=frozenset)
    interleave_images_max: int = 1  # input images allowed with `enable_interleave`

    @property
    def async_capable(self) -> bool:
        return bool(self.endpoints - {Endpoint.MULTIMODAL})


NEGATIVE_PROMPT_LIMIT = 500
SEED_MAX = 2147483647

QWEN_FIXED = ((1664, 928), (1472, 1104), (1328, 1328), (1104, 1472), (928, 1664))
_E1 = frozenset({Endpoint.MULTIMODAL})
_E1_E2 = frozenset({Endpoint.MULTIMODAL, Endpoint.IMAGE_GENERATION})
_E1_E3 = frozenset({Endpoint.MULTIMODAL, Endpoint.TEXT2IMAGE})
_E3 = frozenset({Endpoint.TEXT2IMAGE})
_E4 = frozenset({Endpoint.IMAGE2IMAGE})

QWEN2_SIZE = SizeRule("pixels", 512 * 512, 2048 * 2048)
# qwen-image-max: the newer doc allows custom sizes in the qwen-image-2.0 range besides the
# five fixed ones (which all fall inside that range), the older one only the fixed ones: we
# follow the newer doc.
QWEN_MAX_SIZE = SizeRule("pixels", 512 * 512, 2048 * 2048)
QWEN_FIXED_SIZE = SizeRule("fixed", fixed=QWEN_FIXED)
QWEN_EDIT_SIZE = SizeRule("sides", 512, 2048)
WAN_RECOMMENDED = ((1280, 1280), (1104, 1472), (1472, 1104), (960, 1696), (1696, 960))
WAN26_T2I_SIZE = SizeRule("pixels", 1280 * 1280, 1440 * 1440, fixed=WAN_RECOMMENDED, max_aspect=4.0)
WAN26_EDIT_SIZE = SizeRule(
    "pixels",
    768 * 768,
    2048 * 2048,
    max_aspect=4.0,
    multiple=16,
    presets=(("1K", (1280, 1280)), ("2K", (2048, 2048))),
)
WAN26_INTERLEAVE_SIZE = SizeRule("pixels", 768 * 768, 1280 * 1280, max_aspect=4.0)
WAN25_SIZE = SizeRule("pixels", 1280 * 1280, 1440 * 1440, fixed=WAN_RECOMMENDED, max_aspect=4.0)
WAN22_SIZE = SizeRule("sides", 512, 1440)
WANX_V1_SIZE = SizeRule("fixed", fixed=((1024, 1024), (720, 1280), (1280, 720), (768, 1152)))
WAN25_I2I_SIZE = SizeRule("pixels", 768 * 768, 1280 * 1280, max_aspect=4.0)
WANX_V1_STYLES = frozenset(
    {
        "<auto>",
        "<photography>",
        "<portrait>",
        "<3d cartoon>",
        "<anime>",
        "<oil painting>",
        "<watercolor>",
        "<sketch>",
        "<chinese painting>",
        "<flat illustration>",
    }
)
IMAGEEDIT_FUNCTIONS = frozenset(
    {
        "stylization_all",
        "stylization_local",
        "description_edit",
        "description_edit_with_mask",
        "remove_watermark",
        "expand",
        "super_resolution",
        "colorization",
        "doodle",
        "control_cartoon_feature",
    }
)


def _qwen2(name: str) -> ModelSpec:
    return ModelSpec(name, Family.QWEN, _E1, 800, QWEN2_SIZE, (2048, 2048), 6, 1)


def _qwen_max(name: str) -> ModelSpec:
    return ModelSpec(name, Family.QWEN, _E1, 800, QWEN_MAX_SIZE, (1664, 928), 1, 1)


def _qwen_plus(name: str) -> ModelSpec:
    return ModelSpec(name, Family.QWEN, _E1_E3, 800, QWEN_FIXED_SIZE, (1664, 928), 1, 1)


def _qwen_edit(name: str, n_max: int) -> ModelSpec:
    return ModelSpec(
        name,
        Family.QWEN_EDIT,
        _E1,
        800,
        QWEN_EDIT_SIZE,
        (1024, 1024),
        n_max,
        1,
        images_min=1,
        images_max=3,
    )


def _qwen3(name: str) -> ModelSpec:
    # Text-to-image with no input image, editing with 1-3: one spec covers both.
    return ModelSpec(
        name, Family.QWEN3, _E1, 800, QWEN2_SIZE, (2048, 2048), 6, 1, images_min=0, images_max=3
    )


def _wan27(name: str) -> ModelSpec:
    # wan2.6-image's behaviour (edit mode and interleave), but 0-4 reference images in both
    # modes: DashScope documents text-to-image for 2.7, and nothing narrower for interleave.
    return ModelSpec(
        name,
        Family.WAN26_IMAGE,
        _E1_E2,
        2000,
        WAN26_EDIT_SIZE,
        (1280, 1280),
        4,
        4,
        images_min=0,
        images_max=4,
        interleave_images_max=4,
    )


def _wan22(name: str, *, sync: bool) -> ModelSpec:
    return ModelSpec(
        name, Family.SYNTHESIS, _E3, 500, WAN22_SIZE, (1024, 1024), 4, 4, sync_synthesis=sync
    )


_SPECS: tuple[ModelSpec, ...] = (
    _qwen2("qwen-image-2.0-pro"),
    _qwen2("qwen-image-2.0"),
    _qwen_max("qwen-image-max"),
    _qwen_plus("qwen-image-plus"),
    _qwen_plus("qwen-image"),
    _qwen_edit("qwen-image-edit", 1),
    _qwen_edit("qwen-image-edit-plus", 6),
    _qwen_edit("qwen-image-edit-max", 6),
    _qwen3("qwen-image-3.0"),
    _qwen3("qwen-image-3.0-pro"),
    # z-image-turbo: qwen-style text-to-image; its limits are barely documented, so the
    # simulator is permissive (n 1-6, qwen-image-2.0's pixel range). Default size: 1024*1536.
    ModelSpec("z-image-turbo", Family.QWEN, _E1, 800, QWEN2_SIZE, (1024, 1536), 6, 1),
    ModelSpec("wan2.6-t2i", Family.WAN26_T2I, _E1_E2, 2100, WAN26_T2I_SIZE, (1280, 1280), 4, 4),
    # Edit-mode limits; interleave mode is checked against WAN26_INTERLEAVE_SIZE in models.py.
    ModelSpec(
        "wan2.6-image",
        Family.WAN26_IMAGE,
        _E1_E2,
        2000,
        WAN26_EDIT_SIZE,
        (1280, 1280),
        4,
        4,
        images_min=1,
        images_max=4,
    ),
    _wan27("wan2.7-image"),
    _wan27("wan2.7-image-pro"),
    ModelSpec("wan2.5-t2i-preview", Family.SYNTHESIS, _E3, 2000, WAN25_SIZE, (1280, 1280), 4, 4),
    _wan22("wan2.2-t2i-flash", sync=True),
    _wan22("wan2.2-t2i-plus", sync=True),
    _wan22("wanx2.1-t2i-turbo", sync=False),
    _wan22("wanx2.1-t2i-plus", sync=False),
    ModelSpec(
        "wanx-v1",
        Family.SYNTHESIS,
        _E3,
        500,
        WANX_V1_SIZE,
        (1024, 1024),
        4,
        4,
        styles=WANX_V1_STYLES,
    ),
    ModelSpec(
        "wan2.5-i2i-preview",
        Family.I2I,
        _E4,
        2000,
        WAN25_I2I_SIZE,
        (1280, 1280),
        4,
        4,
        images_min=1,
        images_max=3,
    ),
    ModelSpec(
        "wanx2.1-imageedit",
        Family.IMAGEEDIT,
        _E4,
        800,
        SizeRule("any"),
        (1024, 1024),
        4,
        1,
        images_min=1,
        images_max=2,  # base_image_url and an optional mask_image_url
    ),
)

CATALOGUE: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


# `<family>-YYYY-MM-DD` or `<family>-MMDD`. The family part is greedy, so only the last
# hyphenated date counts; a snapshot of a snapshot is not a catalogue name and stays unknown.
_SNAPSHOT_RE = re.compile(r"^(?P<family>.+)-(?P<date>\d{4}-\d{2}-\d{2}|\d{4})$")


def snapshot_family(name: str) -> str | None:
    """`qwen-image-3.0-pro-2026-09-01` -> `qwen-image-3.0-pro`; None when `name` has no valid
    date suffix (`-2026-13-01` and `-1340` are not dates)."""
    match = _SNAPSHOT_RE.match(name)
    if match is None:
        return None
    date = match.group("date")
    # MMDD carries no year: check it against a leap year so that -0229 is a valid snapshot.
    text, pattern = (date, "%Y-%m-%d") if "-" in date else ("2000" + date, "%Y%m%d")
    try:
        datetime.strptime(text, pattern)
    except ValueError:
        return None
    return match.group("family")


def lookup_model(name: str) -> ModelSpec | None:
    """The spec of `name`, or None for a model DashScope does not have.

    A dated snapshot of a catalogue model gets its family's spec under its own name (so task
    lists and answers show the name the caller sent).
    """
    spec = CATALOGUE.get(name)
    if spec is not None:
        return spec
    family = snapshot_family(name)
    base = CATALOGUE.get(family) if family is not None else None
    return replace(base, name=name) if base is not None else None
