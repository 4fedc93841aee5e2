"""OpenAI images API <-> DashScope: pure translation, no I/O.

- `parse_request`: an OpenAI `images.generate` / `images.edit` body (JSON, or
  the string fields of a multipart form) -> `ImageRequest`, refusing what the
  OpenAI relay refuses (`stream: true`, a `size` written with `×`, an unknown
  `response_format`) with OpenAI-envelope 400s.
- `check_against`: the per-model limits of the routing table, before any
  upstream call.
- `dashscope_body`: `ImageRequest` + `Route` -> the DashScope request body
  (messages or prompt shape), `size` `1024x1024` -> `1024*1024`, `seed` -> int.
- `images_of` / `openai_response`: a DashScope answer (sync, or a finished
  task) -> OpenAI's `{"created", "data": [...], "usage": {...}}` with every
  image, from every choice, every content item and every `results[]` entry.
- `task_object`: the hosted platform's async task object.

DashScope errors -> OpenAI errors are in `openai_errors.py`. Deliberately not
here: fetching images (`image_fetch.py`), calling DashScope
(`generation.py`), sockets (`openai_images.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from proxy.catalogue import (
    BodyShape,
    Route,
)
from proxy.core.validation import images_problem, n_problem, prompt_problem, size_problem
from proxy.fronts.openai.errors import bad_request
from proxy.fronts.openai.input_images import normalize_images

RESPONSE_FORMATS = ("b64_json", "url")
SEED_MAX = 2147483647


class ImageRequest(NamedTuple):
    """An OpenAI images request, validated and normalised."""

    model: str
    prompt: str
    n: int = 1
    size: str | None = None  # DashScope form (`1024*1024`, `1K`); None: the model's default
    openai_size: str | None = None  # as the client wrote it, echoed in task objects
    response_format: str = "b64_json"
    quality: str | None = None
    style: str | None = None
    images: tuple[str, ...] = ()  # http(s) URLs or data URLs: edit mode when non-empty
    negative_prompt: str | None = None
    prompt_extend: bool | None = None
    seed: int | None = None
    watermark: bool | None = None

    @property
    def mode(self) -> str:
        return "edit" if self.images else "generation"


# ------------------------------------------------------------------ request parsing


def parse_request(
    obj: Mapping[str, Any],
    *,
    default_model: str,
    default_format: str,
    images: tuple[str, ...] | None = None,
) -> ImageRequest:
    """Validate an OpenAI images body. `images` is given by the multipart edits endpoint."""
    if _bool(obj, "stream"):
        raise bad_request(
            "stream: true is not supported on the images API of this gateway; "
            "omit stream or set it to false."
        )
    fmt = obj.get("response_format")
    if fmt is None:
        fmt = default_format
    if fmt not in RESPONSE_FORMATS:
        raise bad_request("response_format must be one of: b64_json, url")
    model = obj.get("model")
    if model is None:
        model = default_model
    if not isinstance(model, str) or not model or len(model) > 128 or not model.isprintable():
        raise bad_request("model must be a model name string.")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt is required and must be a non-empty string.")
    n = _int(obj, "n")
    if images is None:
        images = normalize_images(obj.get("image"))
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise bad_request("negative_prompt must be a string.")
    seed = _int(obj, "seed")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise bad_request(f"seed must be an integer between 0 and {SEED_MAX}.")
    extend = _bool(obj, "prompt_extend")
    if extend is None:
        extend = _bool(obj, "prompt_upsampling")
    size = obj.get("size")
    if size is not None and not isinstance(size, str):
        raise bad_request("size must be a string like 1024x1024.")
    return ImageRequest(
        model=model,
        prompt=prompt,
        n=1 if n is None else n,
        size=dashscope_size(size),
        openai_size=size,
        response_format=fmt,
        quality=_str(obj, "quality"),
        style=_str(obj, "style"),
        images=images,
        negative_prompt=negative,
        prompt_extend=extend,
        seed=seed,
        watermark=_bool(obj, "watermark"),
    )


_OPENAI_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_NATIVE_SIZE = re.compile(r"^\d{1,5}\*\d{1,5}$")


def dashscope_size(size: str | None) -> str | None:
    """`1024x1024` -> `1024*1024`; `auto`/None -> None (the model's default); `1K`/`2K` kept."""
    if size is None or size == "auto":
        return None
    m = _OPENAI_SIZE.match(size)
    if m:
        return f"{int(m.group(1))}*{int(m.group(2))}"
    if _NATIVE_SIZE.match(size):
        return size  # already DashScope's form
    if size.upper() in ("1K", "2K"):
        return size.upper()
    if "\u00d7" in size:
        raise bad_request(
            f"size must use a lowercase x between width and height (e.g. "
            f"1024x1024), not the multiplication sign \u00d7: got {size!r}."
        )
    raise bad_request(
        f"size must be WIDTHxHEIGHT with a lowercase x, e.g. 1024x1024; got {size!r}."
    )


def _str(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string.")
    return value


def _int(obj: Mapping[str, Any], name: str) -> int | None:
    """An integer, or a string of digits (the hosted platform's examples send
    `"seed": "123456"`; forms send all fields as strings)."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise bad_request(f"{name} must be an integer, got {value!r}."[:300])


def _bool(obj: Mapping[str, Any], name: str) -> bool | None:
    value = obj.get(name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_request(f"{name} must be true or false, got {value!r}."[:300])


# ------------------------------------------------------------------ to DashScope


def check_against(req: ImageRequest, route: Route) -> None:
    """What DashScope would refuse for this model, refused before an upstream call."""
    spec = route.spec
    name = route.requested
    problem = images_problem(name, spec, len(req.images), known=route.known)
    if route.known:
        problem = (
            problem
            or prompt_problem(name, spec, req.prompt)
            or n_problem(name, spec, req.n)
            or (size_problem(name, spec, req.size) if req.size else None)
        )
    if problem:
        raise bad_request(problem)


def dashscope_body(req: ImageRequest, route: Route) -> dict[str, Any]:
    """The DashScope request body for `req` on `route` (prompt or messages shape)."""
    params: dict[str, Any] = {"n": req.n}
    if req.size:
        params["size"] = req.size
    if req.seed is not None:
        params["seed"] = req.seed
    if req.prompt_extend is not None:
        params["prompt_extend"] = req.prompt_extend
    if req.watermark is not None:
        params["watermark"] = req.watermark
    if req.style and req.style.startswith("<"):
        params["style"] = req.style  # wanx-v1's styles (`<anime>`); OpenAI's vivid/natural are not
    inp: dict[str, Any]
    if route.shape is BodyShape.PROMPT:
        inp = {"prompt": req.prompt}
        if req.negative_prompt:
            inp["negative_prompt"] = req.negative_prompt
        if req.images:
            inp["images"] = list(req.images)
    else:
        content: list[dict[str, str]] = [{"text": req.prompt}]
        content.extend({"image": image} for image in req.images)
        inp = {"messages": [{"role": "user", "content": content}]}
        if req.negative_prompt:
            params["negative_prompt"] = req.negative_prompt
    return {"model": route.target, "input": inp, "parameters": params}


# ---------------------------------------------------------------- from DashScope


@dataclass(frozen=True, slots=True)
class ResultImage:
    url: str
    revised_prompt: str | None = None


def images_of(body: Any) -> list[ResultImage]:
    """Every generated image of a DashScope answer, in order: each content item of each
    choice (E1/E2), each successful `results[]` entry (E3/E4)."""
    out: list[ResultImage] = []
    output = body.get("output") if isinstance(body, dict) else None
    if not isinstance(output, dict):
        return out
    for choice in output.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else ():
            if isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]:
                out.append(ResultImage(item["image"], _text(item.get("actual_prompt"))))
    for result in output.get("results") or ():
        if isinstance(result, dict) and isinstance(result.get("url"), str) and result["url"]:
            out.append(ResultImage(result["url"], _text(result.get("actual_prompt"))))
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def openai_usage(body: Any, images: int) -> dict[str, Any]:
    """The hosted platform's usage block, from DashScope's `usage` (tokens are 0 where it
    has none)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    usage = usage if isinstance(usage, dict) else {}

    def tokens(name: str) -> int:
        v = usage.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    return {
        "generated_images": images,
        "total_tokens": tokens("total_tokens"),
        "input_tokens": tokens("input_tokens"),
        "output_tokens": tokens("output_tokens"),
        "input_tokens_details": {"text_tokens": tokens("input_tokens"), "image_tokens": 0},
    }


def openai_response(
    created: int, images: list[ResultImage], b64: list[object] | None, usage: dict[str, Any]
) -> dict[str, Any]:
    """`{"created", "data", "usage"}`; `b64` holds the fetched images for `b64_json`, as
    JSON string values (`jsonutil.base64_string`)."""
    data: list[dict[str, object]] = []
    for i, image in enumerate(images):
        item: dict[str, object] = {"b64_json": b64[i]} if b64 is not None else {"url": image.url}
        if image.revised_prompt:
            item["revised_prompt"] = image.revised_prompt
        data.append(item)
    return {"created": created, "data": data, "usage": usage}


# -------------------------------------------------------------------- task objects


TASK_STATUS = {
    "PENDING": "QUEUED",
    "RUNNING": "IN_PROGRESS",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "CANCELED": "CANCELED",
    "UNKNOWN": "EXPIRED",
}


def task_object(
    task_id: str, dashscope_status: str, meta: Mapping[str, Any], model: str
) -> dict[str, Any]:
    """The hosted platform's `image.generation.task` object."""
    return {
        "id": task_id,
        "task_id": task_id,
        "object": "image.generation.task",
        "status": TASK_STATUS.get(dashscope_status, "IN_PROGRESS"),
        "created_at": int(meta.get("created_at", 0)),
        "model": model,
        "prompt": meta.get("prompt"),
        "size": meta.get("size") or "auto",
        "quality": meta.get("quality") or "auto",
        "mode": meta.get("mode", "generation"),
    }
