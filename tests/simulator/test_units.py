"""Table tests of the other pure parts: fault directives, response shapes, PNG, tasks, signing."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from proxy.simulator.catalogue import Endpoint
from proxy.simulator.errors import DATA_INSPECTION_OUTPUT
from proxy.simulator.faults import (
    NO_FAULTS,
    FaultQueue,
    Faults,
    faults_in_prompt,
    parse_directives,
    prompt_text,
)
from proxy.simulator.models import GenRequest, validate
from proxy.simulator.png import PNG_SIGNATURE, PngCache, draw_image, encode_png
from proxy.simulator.responses import (
    dumps,
    format_time,
    list_body,
    pad_body,
    poll_body,
    sse_frame,
)
from proxy.simulator.results import Produced, stream_chunks, sync_result
from proxy.simulator.signing import (
    Signer,
    check_image_signature,
    check_policy,
    make_policy,
    parse_image_name,
)
from proxy.simulator.tasks import CancelResult, Task, TaskStatus, TaskTable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("error=429", Faults(error="429")),
        ("error=inspection; slow=1.5", Faults(error="inspection", slow=1.5)),
        ("truncate, badjson", Faults(truncate=True, badjson=True)),
        ("fail pad=2048", Faults(fail=True, pad=2048)),
        ("sse-error=500", Faults(sse_error="500")),
        ("slow=99999", Faults(slow=600.0)),
        ("", NO_FAULTS),
    ],
)
def test_parse_directives(text: str, expected: Faults) -> None:
    assert parse_directives(text) == (expected, [])


@pytest.mark.parametrize("text", ["error=418", "slow=soon", "explode", "fail=yes"])
def test_parse_directives_reports_problems(text: str) -> None:
    faults, problems = parse_directives(text)
    assert faults == NO_FAULTS and len(problems) == 1


def test_prompt_directives_and_prompt_text() -> None:
    assert faults_in_prompt("a [sim:error=503] cat [sim:slow=2]") == Faults(error="503", slow=2)
    assert faults_in_prompt("[sim:nonsense] [sim:error=999]") == NO_FAULTS
    body = {"input": {"messages": [{"role": "user", "content": [{"text": "a"}, {"image": "u"}]}]}}
    assert prompt_text(body) == "a"
    assert prompt_text({"input": {"prompt": "p"}}) == "p"
    assert prompt_text({"input": {"messages": "nope"}}) == ""
    assert prompt_text([1, 2]) == ""


def test_fault_queue_order_and_polls() -> None:
    queue = FaultQueue()
    queue.push(Faults(error="503"), 1, polls=False, text="error=503")
    queue.push(Faults(error="500"), 2, polls=True, text="error=500")
    assert queue.take(is_poll=True) == Faults(error="500")
    assert queue.take(is_poll=False) == Faults(error="503")
    assert queue.take(is_poll=False) == Faults(error="500")
    assert queue.take(is_poll=False) == NO_FAULTS
    assert queue.snapshot() == []


def request(model: str, endpoint: Endpoint, **params: object) -> GenRequest:
    body = {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [{"text": "make soup"}]}]},
        "parameters": params,
    }
    if endpoint in (Endpoint.TEXT2IMAGE, Endpoint.IMAGE2IMAGE):
        body["input"] = {"prompt": "make soup"}
    result = validate(endpoint, body, async_header=endpoint is not Endpoint.MULTIMODAL, sse=True)
    assert isinstance(result, GenRequest), result
    return result


def test_sync_result_shapes() -> None:
    qwen = sync_result(
        request("qwen-image-2.0", Endpoint.MULTIMODAL, n=2), "rid", Produced(("u1", "u2"))
    )
    assert qwen == {
        "output": {
            "choices": [
                {
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": [{"image": "u1"}]},
                },
                {
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": [{"image": "u2"}]},
                },
            ]
        },
        "usage": {"image_count": 2, "width": 2048, "height": 2048},
        "request_id": "rid",
    }
    wan = sync_result(request("wan2.6-t2i", Endpoint.MULTIMODAL, n=1), "rid", Produced(("u",)))
    assert wan["output"]["finished"] is True
    assert wan["output"]["choices"][0]["message"]["content"] == [{"type": "image", "image": "u"}]
    assert wan["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "size": "1280*1280",
        "total_tokens": 0,
        "image_count": 1,
    }


def test_interleave_chunks() -> None:
    req = request("wan2.6-image", Endpoint.MULTIMODAL, enable_interleave=True, max_images=2)
    chunks = stream_chunks(req, "rid", Produced(("u1", "u2")))
    kinds = [c["output"]["choices"][0]["message"]["content"][0]["type"] for c in chunks]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert [c["output"]["finished"] for c in chunks] == [False] * 4 + [True]
    assert chunks[-1]["usage"]["image_count"] == 2


def test_sse_frame_bytes() -> None:
    frame = sse_frame(3, {"output": {"a": "é"}})
    assert frame == 'id:3\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"a":"é"}}\n\n'.encode()
    error = sse_frame(1, {"code": "X"}, event="error", status=429)
    assert error.startswith(b"id:1\nevent:error\n:HTTP_STATUS/429\ndata:")


def test_pad_body_reaches_target() -> None:
    body = {"output": {"x": 1}, "request_id": "r"}
    assert abs(len(dumps(pad_body(body, 5000))) - 5000) <= 1
    assert pad_body(body, 10) == {"output": {"x": 1, "sim_padding": ""}, "request_id": "r"}
    assert pad_body({"code": "x"}, 5000) == {"code": "x"}


def make_task(endpoint: Endpoint, model: str, fail: bool = False) -> Task:
    return Task(
        task_id="t1",
        owner="k",
        request=request(model, endpoint, n=1),
        request_id="r0",
        seed=1,
        image_names=("1-0-aa",),
        submitted_mono=100.0,
        submitted_wall=1_700_000_000.0,
        pending_seconds=1.0,
        running_seconds=2.0,
        fail=fail,
    )


def test_poll_bodies_per_state() -> None:
    task = make_task(Endpoint.TEXT2IMAGE, "wan2.2-t2i-flash")
    pending = poll_body(task, TaskStatus.PENDING, "r", Produced(()), DATA_INSPECTION_OUTPUT)
    assert pending["output"] == {
        "task_id": "t1",
        "task_status": "PENDING",
        "submit_time": "2023-11-15 06:13:20.000",
    }
    running = poll_body(task, TaskStatus.RUNNING, "r", Produced(()), DATA_INSPECTION_OUTPUT)
    assert running["output"]["task_metrics"] == {"TOTAL": 1, "SUCCEEDED": 0, "FAILED": 0}
    done = poll_body(task, TaskStatus.SUCCEEDED, "r", Produced(("u",)), DATA_INSPECTION_OUTPUT)
    assert done["output"]["results"][0]["url"] == "u"
    assert done["usage"] == {"image_count": 1}
    failed = poll_body(task, TaskStatus.FAILED, "r", Produced(()), DATA_INSPECTION_OUTPUT)
    assert failed["output"]["code"] == "DataInspectionFailed" and "code" not in failed

    wan = make_task(Endpoint.IMAGE_GENERATION, "wan2.6-t2i")
    wan_done = poll_body(wan, TaskStatus.SUCCEEDED, "r", Produced(("u",)), DATA_INSPECTION_OUTPUT)
    assert wan_done["output"]["choices"][0]["message"]["role"] == "assistant"
    assert wan_done["usage"]["image_count"] == 1
    wan_failed = poll_body(wan, TaskStatus.FAILED, "r", Produced(()), DATA_INSPECTION_OUTPUT)
    assert wan_failed["code"] == "DataInspectionFailed" and "code" not in wan_failed["output"]


def test_list_body_has_data_and_tasks() -> None:
    body = list_body("r", [{"task_id": "a"}], 21, 2, 10)
    assert body["data"] == body["tasks"] == [{"task_id": "a"}]
    assert (body["total"], body["total_page"], body["page_no"]) == (21, 3, 2)


def test_format_time_is_utc_plus_8() -> None:
    assert format_time(0.5) == "1970-01-01 08:00:00.500"


def test_png_is_valid() -> None:
    png = draw_image(42, 1, 8)
    assert png.startswith(PNG_SIGNATURE)
    position, chunks = len(PNG_SIGNATURE), {}
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + data)
        chunks[kind] = data
        position += 12 + length
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (8, 8, 8, 2, 0, 0, 0)
    assert len(zlib.decompress(chunks[b"IDAT"])) == 8 * (1 + 8 * 3)
    assert draw_image(42, 1, 8) == png != draw_image(42, 2, 8)
    with pytest.raises(ValueError):
        encode_png(2, 2, [b"\x00" * 6])


def test_png_cache_is_bounded() -> None:
    cache = PngCache(4, max_entries=2)
    first = cache.get(1, 0)
    cache.get(2, 0)
    cache.get(3, 0)
    assert cache.get(1, 0) == first


def test_task_lifecycle_and_ownership() -> None:
    table = TaskTable(ttl_seconds=60, limit=10)
    task = make_task(Endpoint.TEXT2IMAGE, "wan2.2-t2i-flash")
    table.add(task, 100.0)
    assert task.status(100.5) is TaskStatus.PENDING
    assert task.status(101.5) is TaskStatus.RUNNING
    assert task.status(103.0) is TaskStatus.SUCCEEDED
    assert table.get("t1", "someone-else", 100.5) is None
    assert table.cancel("t1", "k", 101.5, 0.0) is CancelResult.NOT_PENDING
    assert table.cancel("t1", "k", 100.5, 1_700_000_000.5) is CancelResult.CANCELED
    assert task.status(103.0) is TaskStatus.CANCELED
    assert table.query("k", 100.5, status="canceled") == [task]
    assert table.get("t1", "k", 161.0) is None  # expired -> UNKNOWN
    assert len(table) == 0


def test_task_table_limit_forgets_oldest() -> None:
    table = TaskTable(ttl_seconds=60, limit=1)
    first = make_task(Endpoint.TEXT2IMAGE, "wanx-v1")
    second = make_task(Endpoint.TEXT2IMAGE, "wanx-v1")
    second.task_id = "t2"
    table.add(first, 100.0)
    table.add(second, 100.0)
    assert table.get("t1", "k", 100.0) is None and table.get("t2", "k", 100.0) is second


def test_failing_task_ends_failed() -> None:
    task = make_task(Endpoint.TEXT2IMAGE, "wanx-v1", fail=True)
    assert task.status(104.0) is TaskStatus.FAILED


def test_signatures() -> None:
    signer = Signer(b"secret")
    assert parse_image_name("12-3-abcdef") == (12, 3)
    assert parse_image_name("x-3-abc") is None
    signature = signer.sign("image", "12-3-abcdef", "2000000000")
    assert check_image_signature(signer, "12-3-abcdef", "2000000000", signature)
    assert not check_image_signature(signer, "12-3-abcdef", "2000000001", signature)
    assert not check_image_signature(Signer(b"other"), "12-3-abcdef", "2000000000", signature)

    policy, policy_signature = make_policy(signer, "dir/a", 1000)
    assert json.loads(base64.b64decode(policy))["expiration"] == 1000
    assert check_policy(signer, policy, policy_signature, "dir/a/f.png", 999.0)
    assert not check_policy(signer, policy, policy_signature, "dir/a/f.png", 1001.0)
    assert not check_policy(signer, policy, policy_signature, "dir/b/f.png", 999.0)
    assert not check_policy(signer, policy, policy_signature, "dir/a/../../x", 999.0)
    assert not check_policy(signer, policy, "forged", "dir/a/f.png", 999.0)
