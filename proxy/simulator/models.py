"""Request validation: a request body -> `GenRequest`, or the `ApiError` DashScope answers.

Pure functions over plain values (no I/O, no clock). The model table is in `catalogue.py`, the
single-field parsers in `parsing.py`.
Prompts longer than a model's limit are truncated, not rejected, as DashScope documents. What is
deliberately not checked: that input image URLs can be fetched (an `oss://` reference is
resolved by the app, which owns the upload store), and parameters the simulator ignores.
"""

from __future__ import annotations

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
from .parsing import (
    bool_param,
    choice_param,
    count_check,
    int_param,
    is_image_ref,
    opt_int_param,
    parse_messages,
    resolve_size,
    text_param,
)

MAX_IMAGES_LIMIT = 5
PROMPT_EXTEND_MODELS = ("direct", "agent")  # qwen-image-3.0 `prompt_extend_model`


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


def _model_extras(spec: ModelSpec, params: dict[str, Any]) -> ApiError | None:
    """Parameters only some models define. qwen-image-3.0's are type-checked; wan2.7's
    `thinking_mode`, `enable_sequential` and `bbox_list` pass through unchecked (their
    shapes are not documented well enough to refuse anything)."""
    if spec.family is not Family.QWEN3:
        return None
    thinking = bool_param(params, "enable_thinking", True)
    if isinstance(thinking, ApiError):
        return thinking
    extend_model = choice_param(params, "prompt_extend_model", PROMPT_EXTEND_MODELS)
    return extend_model if isinstance(extend_model, ApiError) else None


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
        text_error = count_check("text items", len(texts), 1, 1)
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

    interleave = bool_param(params, "enable_interleave", False)
    if isinstance(interleave, ApiError):
        return interleave
    interleave = interleave and spec.family is Family.WAN26_IMAGE
    if interleave:
        images_min, images_max = 0, spec.interleave_images_max
    else:
        images_min, images_max = spec.images_min, spec.images_max
    image_error = count_check("input images", len(images), images_min, images_max)
    if image_error is not None:
        return image_error
    if not all(is_image_ref(image) for image in images):
        return INVALID_URL
    if interleave and endpoint is Endpoint.MULTIMODAL and not sse:
        return invalid(
            "The interleave mode only supports streaming output on this endpoint; "
            "send the header X-DashScope-SSE: enable."
        )

    n = int_param(params, "n", 1 if interleave else spec.n_default)
    if isinstance(n, ApiError):
        return n
    n_max = 1 if interleave else spec.n_max
    if not 1 <= n <= n_max:
        if n_max == 1:
            return invalid(f"num_images_per_prompt must be 1 for {spec.name}.")
        return invalid(f"The parameter n must be between 1 and {n_max} for {spec.name}.")
    max_images = int_param(params, "max_images", MAX_IMAGES_LIMIT)
    if isinstance(max_images, ApiError):
        return max_images
    if interleave and not 1 <= max_images <= MAX_IMAGES_LIMIT:
        return invalid(f"The parameter max_images must be between 1 and {MAX_IMAGES_LIMIT}.")

    seed = opt_int_param(params, "seed")
    if isinstance(seed, ApiError):
        return seed
    if seed is not None and not 0 <= seed <= SEED_MAX:
        return invalid(f"The parameter seed must be between 0 and {SEED_MAX}.")

    rule = WAN26_INTERLEAVE_SIZE if interleave else spec.size
    dims = resolve_size(spec, rule, params.get("size"), spec.default_size)
    if isinstance(dims, ApiError):
        return dims

    negative = text_param(params, "negative_prompt", NEGATIVE_PROMPT_LIMIT)
    if isinstance(negative, ApiError):
        return negative
    if not negative:
        negative = text_param(inp, "negative_prompt", NEGATIVE_PROMPT_LIMIT)
        if isinstance(negative, ApiError):
            return negative
    prompt_extend = bool_param(params, "prompt_extend", True)
    if isinstance(prompt_extend, ApiError):
        return prompt_extend
    watermark = bool_param(params, "watermark", False)
    if isinstance(watermark, ApiError):
        return watermark
    style = params.get("style")
    if spec.styles and style is not None and style not in spec.styles:
        return invalid("The parameter style is not supported; use e.g. <auto> or <anime>.")
    extras_error = _model_extras(spec, params)
    if extras_error is not None:
        return extras_error

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
