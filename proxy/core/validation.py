"""What DashScope would refuse for a model, found before an upstream call is spent.

Pure functions over the catalogue's `ModelSpec`: each returns None, or a message a
user can act on (the OpenAI front end raises it as a 400). Sizes are DashScope's
`W*H` form.
"""

from __future__ import annotations

import re

from proxy.catalogue import ModelSpec, SizeRule, edit_models

_SIZE = re.compile(r"^(\d{1,5})\*(\d{1,5})$")


def size_problem(model: str, spec: ModelSpec, size: str) -> str | None:
    """Why DashScope would refuse `size` (in DashScope's `W*H` form) for `model`, or None."""
    rule = spec.size
    if rule.kind == "any" or size.upper() in rule.presets:
        return None
    m = _SIZE.match(size)
    if m is None:
        extra = f" or one of {', '.join(rule.presets)}" if rule.presets else ""
        return f"The size {size} is invalid; use width*height{extra}."
    w, h = int(m.group(1)), int(m.group(2))
    reason = _size_reason(rule, w, h)
    return None if reason is None else f"The size {w}*{h} is not supported by {model}: {reason}."


def _size_reason(rule: SizeRule, w: int, h: int) -> str | None:
    if w <= 0 or h <= 0:
        return "width and height must be positive"
    if rule.kind == "fixed":
        if (w, h) in rule.fixed:
            return None
        return "allowed sizes are " + ", ".join(f"{a}*{b}" for a, b in rule.fixed)
    if rule.kind == "sides" and not (rule.low <= w <= rule.high and rule.low <= h <= rule.high):
        return f"each side must be between {rule.low} and {rule.high} pixels"
    if rule.kind == "pixels" and not rule.low <= w * h <= rule.high:
        return (
            f"width*height must be between {_square(rule.low)} and {_square(rule.high)} "
            "pixels in total"
        )
    if rule.max_aspect and max(w, h) / min(w, h) > rule.max_aspect:
        return "the aspect ratio must be between 1:4 and 4:1"
    if w % rule.multiple or h % rule.multiple:
        return f"width and height must be multiples of {rule.multiple}"
    return None


def _square(pixels: int) -> str:
    side = round(pixels**0.5)
    return f"{side}*{side}" if side * side == pixels else str(pixels)


def n_problem(model: str, spec: ModelSpec, n: int) -> str | None:
    if spec.n_max is None or 1 <= n <= spec.n_max:
        return None
    if spec.n_max == 1:
        return f"n must be 1 for {model} (DashScope: num_images_per_prompt must be 1)."
    return f"n must be between 1 and {spec.n_max} for {model}."


def prompt_problem(model: str, spec: ModelSpec, prompt: str) -> str | None:
    if not prompt.strip():
        return "prompt must not be empty."
    if spec.prompt_limit is not None and len(prompt) > spec.prompt_limit:
        return (
            f"prompt is too long for {model}: {len(prompt)} characters, at most "
            f"{spec.prompt_limit}."
        )
    return None


def images_problem(model: str, spec: ModelSpec, count: int, *, known: bool) -> str | None:
    if not known:
        return None
    if count and not spec.edits:
        return (
            f"{model} does not take input images; use an edit model "
            f"({', '.join(edit_models())}) or map this name to one in the config's models:."
        )
    if not spec.images_min <= count <= spec.images_max:
        return f"{model} needs {spec.images_min} to {spec.images_max} input images, got {count}."
    return None
