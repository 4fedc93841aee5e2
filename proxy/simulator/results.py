"""Pure builders of a finished generation's answer: content items, choices and `usage` per
model family, for E1 (JSON and SSE) and the E2 task poll.

Shapes (DashScope's documented answers):
  qwen-image*, z-image-turbo  one choice per image, items `{"image": url}`,
                              usage `{image_count, width, height}`
  qwen-image-edit*            one choice holding every image
  qwen-image-3.0*             as qwen-image, usage `{output_image_count, input_image_count,
                              output_width, output_height, output_image_type[,
                              input_image_type]}` and no `image_count`; `rewrite_status`
                              when the prompt was extended
  wan2.6 / wan2.7             items carry `type`, `output.finished`, token usage with `size`

`Produced` carries the reshaping directives (`base64`, `textitem`, `nocount`), so every
builder applies them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .catalogue import Family
from .models import GenRequest

Body = dict[str, Any]
# The text a `textitem` answer shows where an image would have been.
TEXT_IN_PLACE = "No image was generated for this part of the request."
# What qwen-image-3.0 reports after rewriting the prompt (`prompt_extend`); DashScope names the
# field but not its values, so the simulator always reports the rewrite as done.
REWRITE_SUCCESS = "success"
_QWEN_STYLE = frozenset({Family.QWEN, Family.QWEN_EDIT, Family.QWEN3})
_COUNT_FIELDS = ("image_count", "output_image_count")


@dataclass(frozen=True)
class Produced:
    """The images of one finished generation, as its answer shows them.

    `refs` has one entry per requested image: its signed URL or, with `inline` (directive
    `base64`), a `data:image/png;base64,...` URL of the same PNG. With `text_last` (directive
    `textitem`) the last entry produced no image: a text item stands in its place. With
    `no_count` (directive `nocount`) `usage` reports no image count at all.
    """

    refs: tuple[str, ...]
    inline: bool = False
    text_last: bool = False
    no_count: bool = False

    @property
    def image_count(self) -> int:
        """The images actually produced (a text item is not an image)."""
        return len(self.refs) - 1 if self.text_last and self.refs else len(self.refs)


def _without_counts(usage: Body, produced: Produced) -> Body:
    if not produced.no_count:
        return usage
    return {key: value for key, value in usage.items() if key not in _COUNT_FIELDS}


def wan_usage(req: GenRequest, image_count: int | None) -> Body:
    usage: Body = {"input_tokens": 0, "output_tokens": 0, "size": req.size, "total_tokens": 0}
    if image_count is not None:
        usage["image_count"] = image_count
    return usage


def _input_image_type(images: tuple[str, ...]) -> str:
    """How the request sent its images: `base64` when every one is a data URL."""
    return "base64" if all(image.startswith("data:") for image in images) else "url"


def result_usage(req: GenRequest, produced: Produced) -> Body:
    """`usage` of a successful answer of `req`'s family."""
    family = req.spec.family
    count = produced.image_count
    if family is Family.QWEN3:
        usage: Body = {
            "output_image_count": count,
            "input_image_count": len(req.images),
            "output_width": req.width,
            "output_height": req.height,
            "output_image_type": "base64" if produced.inline else "url",
        }
        if req.images:  # DashScope omits the input type of a pure text-to-image call
            usage["input_image_type"] = _input_image_type(req.images)
    elif family in (Family.QWEN, Family.QWEN_EDIT):
        usage = {"image_count": count, "width": req.width, "height": req.height}
    elif family in (Family.WAN26_T2I, Family.WAN26_IMAGE):
        usage = wan_usage(req, count)
    else:
        usage = {"image_count": count}
    return _without_counts(usage, produced)


def choice(content: list[Body], finish_reason: str = "stop") -> Body:
    return {"finish_reason": finish_reason, "message": {"role": "assistant", "content": content}}


def _text_item(req: GenRequest, text: str) -> Body:
    return {"text": text} if req.spec.family in _QWEN_STYLE else {"type": "text", "text": text}


def result_items(req: GenRequest, produced: Produced) -> list[Body]:
    """One content item per requested image (`type: image` on wan only), the last one a text
    item under `textitem`."""
    if req.spec.family in _QWEN_STYLE:
        items = [{"image": ref} for ref in produced.refs]
    else:
        items = [{"type": "image", "image": ref} for ref in produced.refs]
    if produced.text_last and items:
        items[-1] = _text_item(req, TEXT_IN_PLACE)
    return items


def image_choices(req: GenRequest, produced: Produced) -> list[Body]:
    """`output.choices` of an E1/E2 result: qwen-image-edit puts all items in one message,
    every other model returns one choice per item."""
    items = result_items(req, produced)
    if req.spec.family is Family.QWEN_EDIT:
        return [choice(items)]
    return [choice([item]) for item in items]


def interleave_texts(req: GenRequest) -> list[str]:
    """The text items around the images of a wan interleave answer."""
    topic = req.prompt.strip().splitlines()[0][:60] if req.prompt.strip() else "your request"
    steps = [f"Step {i + 1} of {req.max_images} for {topic}: " for i in range(req.max_images)]
    return [*steps, "Enjoy!"]


def interleave_content(req: GenRequest, produced: Produced) -> list[Body]:
    """Text, image, text, image, ..., text: the whole interleave answer as content items."""
    texts = interleave_texts(req)
    content: list[Body] = []
    for text, item in zip(texts, result_items(req, produced), strict=False):
        content += [{"type": "text", "text": text}, item]
    content.append({"type": "text", "text": texts[-1]})
    return content


def result_choices(req: GenRequest, produced: Produced) -> list[Body]:
    """`output.choices` of a successful E1 answer or E2 poll."""
    if req.interleave:
        return [choice(interleave_content(req, produced))]
    return image_choices(req, produced)


def result_output(req: GenRequest, produced: Produced) -> Body:
    """`output` of a successful E1 answer (an E2 poll adds the task fields to it)."""
    output: Body = {"choices": result_choices(req, produced)}
    if req.spec.family in (Family.WAN26_T2I, Family.WAN26_IMAGE):
        output["finished"] = True
    if req.spec.family is Family.QWEN3 and req.prompt_extend:
        output["rewrite_status"] = REWRITE_SUCCESS
    return output


def sync_result(req: GenRequest, request_id: str, produced: Produced) -> Body:
    """The HTTP-200 body of a synchronous E1 call."""
    return {
        "output": result_output(req, produced),
        "usage": result_usage(req, produced),
        "request_id": request_id,
    }


def stream_chunks(req: GenRequest, request_id: str, produced: Produced) -> list[Body]:
    """The `data:` payloads of an E1 SSE answer, in order.

    Interleave mode: one content item per event (text, image, text, ...), `finish_reason`
    "null" and `finished: false` until the last event, whose usage has `image_count`. Other
    models: a single final event shaped like the sync result.
    """
    if not req.interleave:
        return [sync_result(req, request_id, produced)]
    items = interleave_content(req, produced)
    chunks: list[Body] = []
    for position, item in enumerate(items):
        last = position == len(items) - 1
        chunks.append(
            {
                "output": {
                    "choices": [choice([item], "stop" if last else "null")],
                    "finished": last,
                },
                "usage": result_usage(req, produced) if last else wan_usage(req, None),
                "request_id": request_id,
            }
        )
    return chunks
