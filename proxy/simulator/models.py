"""Request validation: a request body -> `GenRequest`, or the `ApiError` DashScope answers.

Pure functions over plain values (no I/O, no clock). The model table is in `catalogue.py`.
Prompts longer than a model's limit are truncated, not rejected, as DashScope documents. What is
deliberately not checked: that input image URLs can be fetched (an `oss://` reference is
resolved by the app, which owns the upload store), and parameters the simulator ignores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .catalogue import (
    IMAGEEDIT_FUNCTIONS,
    NEGATIVE_PROMPT_LIMIT,
    SEED_MAX,
    WAN26_INTERLEAVE_SIZE,
    Endpoint,
    Family,
    ModelSpec,
    SizeRule,
    lookup_model,
)
from .errors import (
    ASYNC_NOT_SUPPORTED,
    BAD_JSON,
    EMPTY_INPUT,
    EMPTY_MODEL,
    INVALID_URL,
    MODEL_NOT_EXIST,
    SYNC_NOT_SUPPORTED,
    URL_ERROR,
    ApiError,
    invalid,
)

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*\*\s*(\d{1,5})\s*$")
MAX_IMAGES_LIMIT = 5


@dataclass(frozen=True)
class GenRequest:
    """A validated generation request, with defaults applied and texts truncated."""

    spec: ModelSpec
    endpoint: Endpoint
    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    seed: int | None
    images: tuple[str, ...] = ()
    interleave: bool = False
    max_images: int = 0
    prompt_extend: bool = True

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    @property
    def image_count(self) -> int:
        """How many images the request produces (interleave mode: `max_images`)."""
        return self.max_images if self.interleave else self.n


def check_route(spec: ModelSpec, endpoint: Endpoint, *, async_header: bool) -> ApiError | None:
    """Whether `spec` may be called on `endpoint` in this mode (sync or async)."""
    if async_header and (endpoint is Endpoint.MULTIMODAL or not spec.async_capable):
        return ASYNC_NOT_SUPPORTED
    if endpoint not in spec.endpoints:
        return URL_ERROR
    if not async_header:
        if endpoint in (Endpoint.IMAGE_GENERATION, Endpoint.IMAGE2IMAGE):
            return SYNC_NOT_SUPPORTED
        if endpoint is Endpoint.TEXT2IMAGE and not spec.sync_synthesis:
            return SYNC_NOT_SUPPORTED
    return None


def is_image_ref(value: str) -> bool:
    """An input image DashScope can resolve: http(s) URL, `data:` URI or `oss://` key."""
    if value.startswith(("http://", "https://")):
        return len(value) > len("https://")
    if value.startswith("data:"):
        head, sep, _ = value.partition(",")
        return bool(sep) and head.startswith("data:image/") and head.endswith(";base64")
    return value.startswith("oss://") and len(value) > len("oss://")


def parse_size(text: str) -> tuple[int, int] | None:
    """`"1024*1024"` -> (1024, 1024); anything else (`1024x1024`, `1024×1024`) -> None."""
    match = _SIZE_RE.match(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def check_size(rule: SizeRule, width: int, height: int) -> str | None:
    """Why `width*height` breaks `rule`, or None when it is allowed."""
    if rule.kind == "any":
        return None
    if width <= 0 or height <= 0:
        return "width and height must be positive"
    if (width, height) in rule.fixed:
        return None
    if rule.kind == "fixed":
        return "allowed sizes are " + ", ".join(f"{w}*{h}" for w, h in rule.fixed)
    if rule.kind == "sides" and not (
        rule.low <= width <= rule.high and rule.low <= height <= rule.high
    ):
        return f"each side must be between {rule.low} and {rule.high} pixels"
    if rule.kind == "pixels" and not rule.low <= width * height <= rule.high:
        return f"total pixels must be between {rule.low} and {rule.high}"
    if rule.max_aspect and max(width, height) / min(width, height) > rule.max_aspect:
        return "the aspect ratio must be between 1:4 and 4:1"
    if width % rule.multiple or height % rule.multiple:
        return f"width and height must be multiples of {rule.multiple}"
    return None


def resolve_size(
    spec: ModelSpec, rule: SizeRule, value: object, default: tuple[int, int]
) -> tuple[int, int] | ApiError:
    if value is None:
        return default
    if not isinstance(value, str):
        return invalid("The size parameter must be a string like 1024*1024.")
    for label, dims in rule.presets:
        if value.strip().upper() == label:
            return dims
    dims_or_none = parse_size(value)
    if dims_or_none is None:
        return invalid(f"The size {value!r} is invalid; use width*height, e.g. 1024*1024.")
    reason = check_size(rule, *dims_or_none)
    if reason is not None:
        return invalid(f"The size {value} is not supported by {spec.name}: {reason}.")
    return dims_or_none


def _opt_int_param(params: dict[str, Any], key: str) -> int | None | ApiError:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return invalid(f"The parameter {key} must be an integer.")
    return value


def _int_param(params: dict[str, Any], key: str, default: int) -> int | ApiError:
    value = _opt_int_param(params, key)
    return default if value is None else value


def _bool_param(params: dict[str, Any], key: str, default: bool) -> bool | ApiError:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        return invalid(f"The parameter {key} must be a boolean.")
    return value


def _text_param(source: dict[str, Any], key: str, limit: int) -> str | ApiError:
    value = source.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        return invalid(f"The parameter {key} must be a string.")
    return value[:limit]


def parse_messages(inp: dict[str, Any]) -> tuple[list[str], list[str]] | ApiError:
    """The texts and images of the single user message of `input.messages`."""
    messages = inp.get("messages")
    if not isinstance(messages, list) or not messages:
        return invalid("The input messages must be a non-empty list.")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return invalid("Each message must be an object with a role.")
    if len(messages) != 1 or messages[0]["role"] != "user":
        return invalid("Only a single message with role user is supported.")
    content = messages[0].get("content")
    if isinstance(content, str):
        content = [{"text": content}]
    if not isinstance(content, list) or not content:
        return invalid("The message content must be a non-empty list.")
    texts: list[str] = []
    images: list[str] = []
    for item in content:
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            images.append(item["image"])
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            return invalid('Each content item must be {"text": str} or {"image": str}.')
    return texts, images


def _count_check(what: str, count: int, low: int, high: int) -> ApiError | None:
    if low <= count <= high:
        return None
    if low == high:
        return invalid(f"The number of {what} must be {low}.")
    return invalid(f"The number of {what} must be between {low} and {high}.")


def _synthesis_input(spec: ModelSpec, inp: dict[str, Any]) -> tuple[str, list[str]] | ApiError:
    """E3/E4 `input`: the prompt and the input images of the model's family."""
    prompt = inp.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return invalid("Field required: input.prompt")
    images: list[str] = []
    if spec.family is Family.I2I:
        raw = inp.get("images")
        if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
            return invalid("Field required: input.images")
        images = list(raw)
    elif spec.family is Family.IMAGEEDIT:
        if inp.get("function") not in IMAGEEDIT_FUNCTIONS:
            return invalid("The input.function is missing or not supported.")
        base = inp.get("base_image_url")
        if not isinstance(base, str):
            return invalid("Field required: input.base_image_url")
        images = [base]
        mask = inp.get("mask_image_url")
        if isinstance(mask, str):
            images.append(mask)
    return prompt, images


def validate(
    endpoint: Endpoint, body: object, *, async_header: bool, sse: bool
) -> GenRequest | ApiError:
    """Validate a generation request body posted to `endpoint`.

    One linear checklist: model, route and mode, input, then each parameter.
    """
    if not isinstance(body, dict):
        return BAD_JSON
    model = body.get("model")
    if model is None or model == "":
        return EMPTY_MODEL
    if not isinstance(model, str):
        return invalid("The parameter model must be a string.")
    spec = lookup_model(model)
    if spec is None:
        return MODEL_NOT_EXIST
    route_error = check_route(spec, endpoint, async_header=async_header)
    if route_error is not None:
        return route_error
    inp = body.get("input")
    if not inp:
        return EMPTY_INPUT
    params = body.get("parameters") or {}
    if not isinstance(inp, dict) or not isinstance(params, dict):
        return invalid("The input and parameters fields must be JSON objects.")

    if endpoint in (Endpoint.MULTIMODAL, Endpoint.IMAGE_GENERATION):
        parsed = parse_messages(inp)
        if isinstance(parsed, ApiError):
            return parsed
        texts, images = parsed
        text_error = _count_check("text items", len(texts), 1, 1)
        if text_error is not None:
            return text_error
        prompt = texts[0]
        if not prompt.strip():
            return invalid("The text prompt must not be empty.")
    else:
        synthesis = _synthesis_input(spec, inp)
        if isinstance(synthesis, ApiError):
            return synthesis
        prompt, images = synthesis

    interleave = _bool_param(params, "enable_interleave", False)
    if isinstance(interleave, ApiError):
        return interleave
    interleave = interleave and spec.family is Family.WAN26_IMAGE
    images_min, images_max = (0, 1) if interleave else (spec.images_min, spec.images_max)
    image_error = _count_check("input images", len(images), images_min, images_max)
    if image_error is not None:
        return image_error
    if not all(is_image_ref(image) for image in images):
        return INVALID_URL
    if interleave and endpoint is Endpoint.MULTIMODAL and not sse:
        return invalid(
            "The interleave mode only supports streaming output on this endpoint; "
            "send the header X-DashScope-SSE: enable."
        )

    n = _int_param(params, "n", 1 if interleave else spec.n_default)
    if isinstance(n, ApiError):
        return n
    n_max = 1 if interleave else spec.n_max
    if not 1 <= n <= n_max:
        if n_max == 1:
            return invalid(f"num_images_per_prompt must be 1 for {spec.name}.")
        return invalid(f"The parameter n must be between 1 and {n_max} for {spec.name}.")
    max_images = _int_param(params, "max_images", MAX_IMAGES_LIMIT)
    if isinstance(max_images, ApiError):
        return max_images
    if interleave and not 1 <= max_images <= MAX_IMAGES_LIMIT:
        return invalid(f"The parameter max_images must be between 1 and {MAX_IMAGES_LIMIT}.")

    seed = _opt_int_param(params, "seed")
    if isinstance(seed, ApiError):
        return seed
    if seed is not None and not 0 <= seed <= SEED_MAX:
        return invalid(f"The parameter seed must be between 0 and {SEED_MAX}.")

    rule = WAN26_INTERLEAVE_SIZE if interleave else spec.size
    dims = resolve_size(spec, rule, params.get("size"), spec.default_size)
    if isinstance(dims, ApiError):
        return dims

    negative = _text_param(params, "negative_prompt", NEGATIVE_PROMPT_LIMIT)
    if isinstance(negative, ApiError):
        return negative
    if not negative:
        negative = _text_param(inp, "negative_prompt", NEGATIVE_PROMPT_LIMIT)
        if isinstance(negative, ApiError):
            return negative
    prompt_extend = _bool_param(params, "prompt_extend", True)
    if isinstance(prompt_extend, ApiError):
        return prompt_extend
    watermark = _bool_param(params, "watermark", False)
    if isinstance(watermark, ApiError):
        return watermark
    style = params.get("style")
    if spec.styles and style is not None and style not in spec.styles:
        return invalid("The parameter style is not supported; use e.g. <auto> or <anime>.")

    return GenRequest(
        spec=spec,
        endpoint=endpoint,
        prompt=prompt[: spec.prompt_limit],
        negative_prompt=negative,
        n=n,
        width=dims[0],
        height=dims[1],
        seed=seed,
        images=tuple(images),
        interleave=interleave,
        max_images=max_images if interleave else 0,
        prompt_extend=prompt_extend,
    )
