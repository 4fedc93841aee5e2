"""Pure metering extraction: JSON facts, the bounded body scanner, the SSE sniffer."""

from __future__ import annotations

import json

import pytest

from proxy.metering import PARSE_LIMIT, BodyFacts, BodySniffer, SseSniffer, facts_from_json


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"output": {"choices": []}, "usage": {"image_count": 2}}, BodyFacts(2, None, None)),
        ({"output": {"task_id": "t1", "task_status": "PENDING"}}, BodyFacts(None, "t1", "PENDING")),
        (
            {"output": {"task_id": "t1", "task_status": "SUCCEEDED"}, "usage": {"image_count": 1}},
            BodyFacts(1, "t1", "SUCCEEDED"),
        ),
        ({"usage": {"image_count": True}}, BodyFacts()),  # a bool is not a count
        ({"usage": {"image_count": -3}}, BodyFacts()),
        ({"usage": {"image_count": "4"}}, BodyFacts()),
        ({"usage": "nope", "output": []}, BodyFacts()),
        ([1, 2], BodyFacts()),
        (
            {"output": {"choices": [{"finish_reason": "stop"}]}, "usage": {"image_count": 3}},
            BodyFacts(3, None, None, True),
        ),
    ],
)
def test_facts_from_json(body: object, expected: BodyFacts) -> None:
    assert facts_from_json(body) == expected


def _feed(sniffer: BodySniffer | SseSniffer, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        sniffer.feed(data[i : i + size])


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536])
def test_large_body_is_scanned_not_held(chunk: int) -> None:
    body = json.dumps(
        {
            "output": {
                "task_id": "abc-1",
                "task_status": "SUCCEEDED",
                "pad": "x" * (PARSE_LIMIT * 3),
            },
            "usage": {"image_count": 4},
        }
    ).encode()
    s = BodySniffer()
    _feed(s, body, chunk)
    assert s.facts() == BodyFacts(4, "abc-1", "SUCCEEDED")
    assert s._buf is None  # switched to scanning


def test_small_body_is_parsed_exactly() -> None:
    # A prompt that mentions "image_count" inside a string must not be counted.
    body = json.dumps({"output": {"text": '"image_count": 99'}, "usage": {"image_count": 1}})
    s = BodySniffer()
    _feed(s, body.encode(), 5)
    assert s.facts().image_count == 1


def sse(*events: tuple[str, dict[str, object]]) -> bytes:
    out = []
    for i, (kind, data) in enumerate(events, 1):
        out.append(f"id:{i}\nevent:{kind}\n:HTTP_STATUS/200\ndata:{json.dumps(data)}\n\n")
    return "".join(out).encode()


@pytest.mark.parametrize("chunk", [1, 3, 50, 10_000])
def test_sse_final_event_counts(chunk: int) -> None:
    stream = sse(
        ("result", {"output": {"finished": False}, "usage": {"image_count": 1}}),
        ("result", {"output": {"finished": False}, "usage": {"image_count": 2}}),
        ("result", {"output": {"finished": True}, "usage": {"image_count": 3}}),
    )
    s = SseSniffer()
    _feed(s, stream, chunk)
    assert s.facts().image_count == 3 and s.facts().finished


def test_sse_error_frame_counts_nothing() -> None:
    stream = sse(
        ("result", {"output": {}, "usage": {"image_count": 1}}),
        ("error", {"code": "Throttling", "message": "x", "request_id": "r"}),
    )
    s = SseSniffer()
    _feed(s, stream, 9)
    assert s.error and s.facts() == BodyFacts()


def test_sse_crlf_and_partial_trailing_event() -> None:
    stream = sse(("result", {"usage": {"image_count": 2}})).replace(b"\n", b"\r\n")
    s = SseSniffer()
    s.feed(stream + b'id:9\nevent:result\ndata:{"usage":{"image_co')
    assert s.facts().image_count == 2  # the unterminated event is not counted


def test_model_labels_bounded_and_kept_across_reload() -> None:
    from proxy.metrics import OTHER, ModelLabels

    labels = ModelLabels(["gpt-image-1"], max_seen=2)
    assert labels.label("gpt-image-1") == "gpt-image-1"
    assert labels.label("qwen-image-2.0") == "qwen-image-2.0"  # documented model
    assert labels.label("brand-new") == OTHER
    for name in ("brand-new", "second", "third", "Bad Name!"):
        labels.seen_succeeding(name)
    assert [labels.label(n) for n in ("brand-new", "second", "third", "Bad Name!")] == [
        "brand-new",
        "second",
        OTHER,
        OTHER,
    ]  # capped at max_seen; odd shapes never
    reloaded = labels.reconfigured([])
    assert reloaded.label("brand-new") == "brand-new"
    assert reloaded.label("gpt-image-1") == OTHER  # no longer configured
