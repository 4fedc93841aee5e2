"""Finding the images in a DashScope answer and replacing them with links. Pure.

Images sit at two places in DashScope's answers (sync answers, SSE events, task polls):
`output.results[].url` (the wan / text2image families) and
`output.choices[].message.content[].image` (qwen-image and the multimodal models). Each is
an http(s) URL, or inline data (a `data:` URL or raw base64).

Replacing keeps everything else in the answer byte for byte: the JSON encoding of each
old string is substituted in the raw bytes by the encoding of its link (field order,
spacing and every other value stay as DashScope sent them). Only when an image's
encoding does not appear verbatim (DashScope escaped it differently from us) is the
body re-encoded from its parsed form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.jsonutil import dumps, loads


def image_refs(obj: Any) -> list[str]:
    """Every image of one answer, in order (URLs and inline data alike), each once."""
    out: list[str] = []
    output = obj.get("output") if isinstance(obj, dict) else None
    if not isinstance(output, dict):
        return out
    results = output.get("results")
    for item in results if isinstance(results, list) else ():
        if isinstance(item, dict) and isinstance(item.get("url"), str) and item["url"]:
            out.append(item["url"])
    choices = output.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else ():
            if isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]:
                out.append(item["image"])
    return list(dict.fromkeys(out))


def substitute(raw: bytes, links: Mapping[str, str]) -> bytes | None:
    """`raw` with each JSON-encoded key of `links` replaced by its encoded link; None when
    some key does not appear verbatim."""
    for old, new in links.items():
        encoded = dumps(old)
        if encoded not in raw:
            return None
        raw = raw.replace(encoded, dumps(new))
    return raw


def _replaced(value: Any, links: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return links.get(value, value)
    if isinstance(value, dict):
        return {k: _replaced(v, links) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, links) for v in value]
    return value


def rewrite_json(raw: bytes, obj: Any, links: Mapping[str, str]) -> bytes:
    """The answer `raw` (parsed: `obj`) with its images replaced by `links`."""
    if not links:
        return raw
    done = substitute(raw, links)
    return done if done is not None else dumps(_replaced(obj, links))


def event_refs(block: bytes) -> list[tuple[bytes, Any]]:
    """The `data:` payloads of a block of complete SSE events that are JSON objects
    holding images: (payload bytes, parsed)."""
    out: list[tuple[bytes, Any]] = []
    for line in block.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if b'"output"' not in payload:
            continue
        try:
            obj = loads(payload)
        except (ValueError, RecursionError):
            continue
        if image_refs(obj):
            out.append((payload, obj))
    return out


def rewrite_events(
    block: bytes, payloads: list[tuple[bytes, Any]], links: Mapping[str, str]
) -> bytes:
    """`block` with the images of its `payloads` replaced by `links`."""
    for payload, obj in payloads:
        wanted = {ref: links[ref] for ref in image_refs(obj) if ref in links}
        if wanted:
            block = block.replace(payload, rewrite_json(payload, obj, wanted), 1)
    return block
