"""Fault directives: errors and misbehaviour on demand.

Besides faults, three directives reshape a successful answer (`AnswerShape`), for tests of
clients that must cope with DashScope's rarer answers.

Three sources, merged per request: `[sim:...]` directives in the prompt text, the `X-Sim-Fault`
header (same text without brackets, several separated by `;`, `,` or spaces), and faults
queued with `POST /_sim/faults`. Parsing is pure; `FaultQueue` is the per-app queue.

Directives (see docs/simulator.md):
  error=401|403|429|inspection|500|503|...  answer with that DashScope error
  slow=SECONDS                              wait before answering
  truncate                                  headers and half the body, then drop the connection
  badjson                                   HTTP 200 with a body that is not JSON
  fail                                      the task ends FAILED (sync calls: 400 inspection)
  pad=BYTES                                 grow `output` with a filler field to ~BYTES
  sse-error=429|...                         HTTP 200 SSE stream whose second frame is an error
  base64                                    image content items carry data URLs, not URLs
  textitem                                  the last image is a text-only content item instead
  nocount                                   `usage` has no image_count / output_image_count
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from .errors import FAULT_ERRORS

_DIRECTIVE_RE = re.compile(r"\[sim:([^\]]*)\]")
_SPLIT_RE = re.compile(r"[;,\s]+")
MAX_SLOW_SECONDS = 600.0
MAX_PAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class AnswerShape:
    """How a successful answer is reshaped. The default value changes nothing."""

    inline_images: bool = False  # `base64`
    text_item: bool = False  # `textitem`
    no_count: bool = False  # `nocount`


@dataclass(frozen=True)
class Faults:
    """What to do wrong for one request. The default value does nothing."""

    error: str | None = None
    slow: float = 0.0
    truncate: bool = False
    badjson: bool = False
    fail: bool = False
    pad: int = 0
    sse_error: str | None = None
    base64: bool = False
    textitem: bool = False
    nocount: bool = False

    def merge(self, other: Faults) -> Faults:
        """Both sets of faults; on conflict `self` wins for errors, the larger value otherwise."""
        return Faults(
            error=self.error or other.error,
            slow=max(self.slow, other.slow),
            truncate=self.truncate or other.truncate,
            badjson=self.badjson or other.badjson,
            fail=self.fail or other.fail,
            pad=max(self.pad, other.pad),
            sse_error=self.sse_error or other.sse_error,
            base64=self.base64 or other.base64,
            textitem=self.textitem or other.textitem,
            nocount=self.nocount or other.nocount,
        )

    @property
    def shape(self) -> AnswerShape:
        return AnswerShape(self.base64, self.textitem, self.nocount)

    @property
    def active(self) -> bool:
        return self != Faults()


NO_FAULTS = Faults()
# Directives without a value, each setting the `Faults` field of the same name.
_FLAGS = {
    "truncate": Faults(truncate=True),
    "badjson": Faults(badjson=True),
    "fail": Faults(fail=True),
    "base64": Faults(base64=True),
    "textitem": Faults(textitem=True),
    "nocount": Faults(nocount=True),
}


def _apply(faults: Faults, directive: str) -> Faults | str:
    """`faults` plus one directive like `error=429`, or a problem description."""
    name, _, value = directive.strip().partition("=")
    name, value = name.strip().lower(), value.strip()
    if name in ("error", "sse-error"):
        if value.lower() not in FAULT_ERRORS:
            return f"unknown error kind {value!r} (use one of {', '.join(FAULT_ERRORS)})"
        if name == "error":
            return replace(faults, error=value.lower())
        return replace(faults, sse_error=value.lower())
    if name in ("slow", "pad"):
        try:
            number = float(value)
        except ValueError:
            return f"{name} needs a number, got {value!r}"
        if name == "slow":
            return replace(faults, slow=min(max(number, 0.0), MAX_SLOW_SECONDS))
        return replace(faults, pad=int(min(max(number, 0.0), MAX_PAD_BYTES)))
    if not value and name in _FLAGS:
        return faults.merge(_FLAGS[name])
    return f"unknown directive {directive.strip()!r}"


def parse_directives(text: str) -> tuple[Faults, list[str]]:
    """Parse header-style directive text (`error=429; slow=1`): the faults and any problems."""
    faults = NO_FAULTS
    problems: list[str] = []
    for part in _SPLIT_RE.split(text.strip()):
        if not part:
            continue
        result = _apply(faults, part)
        if isinstance(result, str):
            problems.append(result)
        else:
            faults = result
    return faults, problems


def faults_in_prompt(prompt: str) -> Faults:
    """The `[sim:...]` directives embedded in a prompt; malformed ones are ignored."""
    faults = NO_FAULTS
    for match in _DIRECTIVE_RE.finditer(prompt):
        faults = faults.merge(parse_directives(match.group(1))[0])
    return faults


def prompt_text(body: object) -> str:
    """The prompt of a request body, found leniently (never fails): `input.prompt`, or the
    `text` items of the first user message of `input.messages`."""
    if not isinstance(body, dict):
        return ""
    inp = body.get("input")
    if not isinstance(inp, dict):
        return ""
    if isinstance(inp.get("prompt"), str):
        return str(inp["prompt"])
    messages = inp.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    item["text"]
                    for item in content
                    if isinstance(item, dict) and isinstance(item.get("text"), str)
                )
            return ""
    return ""


@dataclass
class _Queued:
    faults: Faults
    remaining: int
    polls: bool
    text: str


class FaultQueue:
    """Faults queued for the next N calls. Model calls take from the first entry; task polls,
    cancels and lists only from entries queued with `polls: true`."""

    def __init__(self) -> None:
        self._entries: deque[_Queued] = deque()

    def push(self, faults: Faults, count: int, *, polls: bool, text: str) -> None:
        if count > 0:
            self._entries.append(_Queued(faults, count, polls, text))

    def take(self, *, is_poll: bool) -> Faults:
        for entry in self._entries:
            if is_poll and not entry.polls:
                continue
            entry.remaining -= 1
            if entry.remaining <= 0:
                self._entries.remove(entry)
            return entry.faults
        return NO_FAULTS

    def clear(self) -> None:
        self._entries.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"fault": e.text, "remaining": e.remaining, "polls": e.polls} for e in self._entries
        ]
