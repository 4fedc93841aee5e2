"""Pure builders of DashScope's response bodies: SSE frames, task submits, polls, cancel, list,
upload policy and errors. The answers of a finished generation are built in `results.py`.

SDK crash rules honoured here: every HTTP-200 JSON body of E1/E2 has a dict `output`; every
message has a `role`; SSE `data:` is one line of JSON; error frames are `event:error` with no
space; streams never end with `[DONE]`. No I/O and no clock: times are passed in.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from .catalogue import Family
from .errors import ApiError
from .models import GenRequest
from .results import Produced, result_output, result_usage
from .tasks import Task, TaskStatus

Body = dict[str, Any]
CST = timezone(timedelta(hours=8))  # DashScope task timestamps are UTC+8
_PAD_FIELD = "sim_padding"


def dumps(body: object) -> bytes:
    """Compact UTF-8 JSON, non-ASCII unescaped (as DashScope sends it)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def format_time(epoch: float) -> str:
    """`2025-12-16 04:21:02.275`: the task timestamp format, in UTC+8."""
    return datetime.fromtimestamp(epoch, tz=CST).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def error_body(request_id: str, error: ApiError) -> Body:
    return {"request_id": request_id, "code": error.code, "message": error.message}


def pad_body(body: Body, target_bytes: int) -> Body:
    """`body` with a filler string in `output` so its JSON is about `target_bytes` long."""
    output = body.get("output")
    if target_bytes <= 0 or not isinstance(output, dict):
        return body
    overhead = len(dumps({**body, "output": {**output, _PAD_FIELD: ""}}))
    filler = "x" * max(target_bytes - overhead, 0)
    return {**body, "output": {**output, _PAD_FIELD: filler}}


def sse_frame(event_id: int, payload: Body, *, event: str = "result", status: int = 200) -> bytes:
    """`id:N\\nevent:result\\n:HTTP_STATUS/200\\ndata:<json>\\n\\n` (no spaces after colons)."""
    head = f"id:{event_id}\nevent:{event}\n:HTTP_STATUS/{status}\ndata:"
    return head.encode() + dumps(payload) + b"\n\n"


def submit_body(request_id: str, task_id: str) -> Body:
    return {"output": {"task_status": "PENDING", "task_id": task_id}, "request_id": request_id}


def synthesis_results(req: GenRequest, urls: tuple[str, ...]) -> list[Body]:
    actual = f"{req.prompt}, highly detailed, soft light" if req.prompt_extend else req.prompt
    return [{"orig_prompt": req.prompt, "actual_prompt": actual, "url": url} for url in urls]


def _metrics(total: int, succeeded: int, failed: int) -> Body:
    return {"TOTAL": total, "SUCCEEDED": succeeded, "FAILED": failed}


def poll_body(
    task: Task, status: TaskStatus, request_id: str, produced: Produced, fail: ApiError
) -> Body:
    """`GET /tasks/{id}` for a task in `status`; `produced` is used only once it SUCCEEDED.

    Synthesis (E3/E4) tasks answer `results[]` + `task_metrics`, code/message of a failure
    inside `output`; image-generation (E2) tasks answer `choices` + token usage, code/message
    of a failure at the top level (both as the respective DashScope pages document).
    """
    req = task.request
    synthesis = req.spec.family not in (Family.WAN26_T2I, Family.WAN26_IMAGE)
    output: Body = {"task_id": task.task_id, "task_status": str(status)}
    output["submit_time"] = format_time(task.submitted_wall)
    body: Body = {"request_id": request_id, "output": output}
    if status is TaskStatus.PENDING:
        return body
    if status is TaskStatus.CANCELED:
        output["end_time"] = format_time(task.end_wall)
        return body
    output["scheduled_time"] = format_time(task.scheduled_wall)
    if status is TaskStatus.RUNNING:
        if synthesis:
            output["task_metrics"] = _metrics(req.n, 0, 0)
        return body
    output["end_time"] = format_time(task.end_wall)
    if status is TaskStatus.FAILED:
        if synthesis:
            output.update(code=fail.code, message=fail.message)
            output["task_metrics"] = _metrics(req.n, 0, req.n)
        else:
            body.update(code=fail.code, message=fail.message)
        return body
    if synthesis:
        output["results"] = synthesis_results(req, produced.refs)
        output["task_metrics"] = _metrics(req.n, produced.image_count, 0)
    else:
        output.update(result_output(req, produced))
    body["usage"] = result_usage(req, produced)
    return body


def unknown_task_body(request_id: str, task_id: str) -> Body:
    return {"request_id": request_id, "output": {"task_id": task_id, "task_status": "UNKNOWN"}}


def cancel_body(request_id: str) -> Body:
    return {"request_id": request_id}


def task_summary(task: Task, status: TaskStatus) -> Body:
    """One entry of `GET /tasks` (times in epoch milliseconds)."""
    req = task.request
    end = int(task.end_wall * 1000) if status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED) else None
    task_kind = "image-generation" if req.endpoint == "image-generation" else req.endpoint
    function = "generation" if task_kind == "image-generation" else "image-synthesis"
    return {
        "api_key_id": task.api_key_id,
        "caller_parent_id": "1000000000000000",
        "caller_uid": "1000000000000000",
        "gmt_create": int(task.submitted_wall * 1000),
        "start_time": int(task.scheduled_wall * 1000),
        "end_time": end,
        "model_name": req.model,
        "region": "cn-beijing",
        "request_id": task.request_id,
        "status": str(status),
        "task_id": task.task_id,
        "user_api_unique_key": f"apikey:v1:aigc:{task_kind}:{function}:{req.model}",
    }


def list_body(
    request_id: str, entries: list[Body], total: int, page_no: int, page_size: int
) -> Body:
    """The task list, under both `data` (documented, 1.x) and `tasks` (read by the v2 SDK)."""
    total_page = (total + page_size - 1) // page_size if page_size else 0
    return {
        "total": total,
        "total_page": total_page,
        "page_no": page_no,
        "page_size": page_size,
        "request_id": request_id,
        "data": entries,
        "tasks": entries,
    }


def policy_body(
    request_id: str, *, policy: str, signature: str, upload_dir: str, upload_host: str
) -> Body:
    return {
        "request_id": request_id,
        "data": {
            "policy": policy,
            "signature": signature,
            "upload_dir": upload_dir,
            "upload_host": upload_host,
            "expire_in_seconds": 300,
            "max_file_size_mb": 100,
            "capacity_limit_mb": 999999999,
            "oss_access_key_id": "LTAIsimulatorKey",
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        },
    }


def utc_now_text(epoch: float) -> str:
    """ISO time for the simulator's own endpoints (not a DashScope format)."""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat()
