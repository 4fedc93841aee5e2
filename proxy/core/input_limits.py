"""Prompt lengths: the input limit that is not the body size or a header size.

Body size is `server.max_body_bytes` (enforced by `inbound.read_body`), JSON
nesting is bounded by the parser (a too-deep document is a 400, never a crash),
and header sizes by the HTTP server (`proxy.ops.runner`). Here:

- `check_prompts`: text prompts over `MAX_PROMPT_CHARS` are refused with a
  clear 400 before they cost an upstream call. DashScope's longest documented
  prompt limit is a few thousand characters (and it truncates, not refuses),
  so the cap only stops absurd inputs, for any model, known or not; per-model
  limits are the front ends' business (`proxy.catalogue`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from proxy.errors import prompt_too_long

MAX_PROMPT_CHARS = 100_000


def native_prompts(obj: Mapping[str, Any]) -> Iterator[str]:
    """Pure: every prompt-like text of a native DashScope body (prompt, negative prompt,
    message texts), found leniently; nothing else (image data URLs may be megabytes)."""
    inp = obj.get("input")
    params = obj.get("parameters")
    for holder, name in ((inp, "prompt"), (inp, "negative_prompt"), (params, "negative_prompt")):
        if isinstance(holder, dict) and isinstance(holder.get(name), str):
            yield holder[name]
    messages = inp.get("messages") if isinstance(inp, dict) else None
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    yield item["text"]


def check_prompt(text: str) -> None:
    """400 if one prompt is absurdly long."""
    if len(text) > MAX_PROMPT_CHARS:
        raise prompt_too_long(len(text), MAX_PROMPT_CHARS)


def check_prompts(obj: Mapping[str, Any]) -> None:
    """400 if the prompts of a native body together are absurdly long."""
    total = 0
    for text in native_prompts(obj):
        total += len(text)
        if total > MAX_PROMPT_CHARS:
            raise prompt_too_long(sum(len(t) for t in native_prompts(obj)), MAX_PROMPT_CHARS)
