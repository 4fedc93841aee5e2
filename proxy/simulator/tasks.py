"""The in-memory task table of one simulator app.

A task's status is computed when it is read, from the time elapsed since submission
(PENDING for `pending_seconds`, then RUNNING for `running_seconds`, then SUCCEEDED or FAILED),
so there are no background timers. Cancellation is allowed only while PENDING. Tasks belong
to the API key that created them: another key, an unknown id and an expired id all read as
missing (the handlers answer UNKNOWN, as DashScope does per account).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from .faults import AnswerShape
from .models import GenRequest


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED})


@dataclass
class Task:
    """One submitted task. Times: `*_mono` for the schedule, `*_wall` (epoch) for display."""

    task_id: str
    owner: str
    request: GenRequest
    request_id: str
    seed: int
    image_names: tuple[str, ...]
    submitted_mono: float
    submitted_wall: float
    pending_seconds: float
    running_seconds: float
    fail: bool = False
    pad: int = 0
    shape: AnswerShape = AnswerShape()  # `base64` / `textitem` / `nocount` for the result
    canceled_wall: float | None = None
    counted: bool = field(default=False)  # images added to the stats already

    def status(self, now_mono: float) -> TaskStatus:
        if self.canceled_wall is not None:
            return TaskStatus.CANCELED
        elapsed = now_mono - self.submitted_mono
        if elapsed < self.pending_seconds:
            return TaskStatus.PENDING
        if elapsed < self.pending_seconds + self.running_seconds:
            return TaskStatus.RUNNING
        return TaskStatus.FAILED if self.fail else TaskStatus.SUCCEEDED

    @property
    def scheduled_wall(self) -> float:
        return self.submitted_wall + self.pending_seconds

    @property
    def end_wall(self) -> float:
        if self.canceled_wall is not None:
            return self.canceled_wall
        return self.submitted_wall + self.pending_seconds + self.running_seconds

    @property
    def api_key_id(self) -> str:
        """A stable public id for the owning key (never the key itself)."""
        return str(int(hashlib.sha256(self.owner.encode()).hexdigest()[:8], 16))


class CancelResult(StrEnum):
    CANCELED = "canceled"
    MISSING = "missing"
    NOT_PENDING = "not-pending"


class TaskTable:
    """Tasks by id in submission order; expired ones and those beyond `limit` are forgotten."""

    def __init__(self, ttl_seconds: float, limit: int) -> None:
        self._ttl = ttl_seconds
        self._limit = max(limit, 1)
        self._tasks: OrderedDict[str, Task] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def _expire(self, now_mono: float) -> None:
        while self._tasks:
            oldest = next(iter(self._tasks.values()))
            if now_mono - oldest.submitted_mono <= self._ttl and len(self._tasks) <= self._limit:
                break
            self._tasks.popitem(last=False)

    def add(self, task: Task, now_mono: float) -> None:
        self._tasks[task.task_id] = task
        self._expire(now_mono)

    def get(self, task_id: str, owner: str, now_mono: float) -> Task | None:
        """The caller's task, or None when it is unknown, expired or someone else's."""
        self._expire(now_mono)
        task = self._tasks.get(task_id)
        if task is None or task.owner != owner:
            return None
        return task

    def cancel(self, task_id: str, owner: str, now_mono: float, now_wall: float) -> CancelResult:
        task = self.get(task_id, owner, now_mono)
        if task is None:
            return CancelResult.MISSING
        if task.status(now_mono) is not TaskStatus.PENDING:
            return CancelResult.NOT_PENDING
        task.canceled_wall = now_wall
        return CancelResult.CANCELED

    def query(
        self,
        owner: str,
        now_mono: float,
        *,
        model: str | None = None,
        status: str | None = None,
        start_wall: float | None = None,
        end_wall: float | None = None,
    ) -> list[Task]:
        """The caller's tasks matching the filters, newest first."""
        self._expire(now_mono)
        found = []
        for task in reversed(self._tasks.values()):
            if task.owner != owner or (model and task.request.model != model):
                continue
            if status and task.status(now_mono) != status.upper():
                continue
            if start_wall is not None and task.submitted_wall < start_wall:
                continue
            if end_wall is not None and task.submitted_wall > end_wall:
                continue
            found.append(task)
        return found
