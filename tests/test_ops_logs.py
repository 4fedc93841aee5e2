"""Structured access lines and the usage ledger: content, absence of secrets, durability."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, GatewayFactory, gateway_yaml
from tests.ops_support import MM, REPO, Launcher, body, launching, wait_for
from tests.support import Live

ACCESS_FIELDS = {
    "ts",
    "request_id",
    "dashscope_request_id",
    "key",
    "model",
    "route",
    "method",
    "upstream",
    "status",
    "error_code",
    "images",
    "latency_ms",
    "pid",
}
# Every line carries its price too (null when the model has no price or the size is unknown).
LEDGER_FIELDS = {
    "ts",
    "key",
    "model",
    "images",
    "route",
    "upstream",
    "request_id",
    "task_id",
    "cost",
    "currency",
    "width",
    "height",
}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
WRONG_KEY = "gw-wrong-secret-9999"
MARKER = "PROMPT-MARKER-7f3a"


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def run_async_task(url: str, key: str) -> str:
    r = requests.post(
        url + "/api/v1/services/aigc/text2image/image-synthesis",
        json={
            "model": "qwen-image-plus",
            "input": {"prompt": f"{MARKER} tower"},
            "parameters": {"size": "1328*1328", "n": 1},
        },
        headers={"Authorization": f"Bearer {key}", "X-DashScope-Async": "enable"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    task_id: str = r.json()["output"]["task_id"]

    def done() -> bool:
        poll = requests.get(
            f"{url}/api/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        return bool(poll.json()["output"]["task_status"] == "SUCCEEDED")

    wait_for(done, 10, "the task to succeed")
    return task_id


def test_access_lines_and_ledger_hold_every_field_and_no_secret(
    launcher: Launcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger" / "usage.jsonl"  # the directory is created
    gw = launcher.start(server=f"  usage_log: {ledger}\n")
    assert gw.generate(KEY_A, f"{MARKER} a red fox", n=2).status_code == 200
    assert gw.generate(WRONG_KEY).status_code == 401
    assert gw.generate(KEY_A, f"{MARKER} [sim:error=429]").status_code == 429
    assert gw.generate(KEY_B, model="wanx-v1").status_code == 403
    task_id = run_async_task(gw.url, KEY_A)
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0

    lines = gw.access_lines()
    for line in lines:
        assert set(line) == ACCESS_FIELDS, line
        assert TS.match(line["ts"]) and line["pid"] == gw.proc.pid
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f-]{36}", line["request_id"])
    by_status: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        by_status.setdefault(line["status"], []).append(line)
    ok = by_status[200][0]
    assert (ok["key"], ok["model"], ok["route"], ok["upstream"], ok["images"], ok["method"]) == (
        "team-a",
        "qwen-image-2.0",
        "multimodal-generation",
        "sim",
        2,
        "POST",
    )
    assert ok["dashscope_request_id"] and ok["error_code"] is None
    denied = by_status[401][0]
    assert (denied["key"], denied["error_code"], denied["upstream"]) == (
        "anonymous",
        "InvalidApiKey",
        None,
    )
    throttled = by_status[429][0]
    assert throttled["error_code"] == "Throttling.RateQuota" and throttled["images"] == 0
    assert throttled["dashscope_request_id"]
    forbidden = by_status[403][0]
    assert (forbidden["key"], forbidden["model"], forbidden["error_code"]) == (
        "team-b",
        "wanx-v1",
        "AccessDenied",
    )
    polls = [x for x in lines if x["route"] == "tasks.get"]
    assert sum(x["images"] for x in polls) == 1  # metered once, on the first SUCCEEDED poll

    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert len(entries) == 2
    for e in entries:
        assert set(e) == LEDGER_FIELDS and TS.match(e["ts"])
    sync, task = entries
    assert (sync["key"], sync["model"], sync["images"], sync["task_id"], sync["request_id"]) == (
        "team-a",
        "qwen-image-2.0",
        2,
        None,
        ok["request_id"],
    )
    assert (task["key"], task["model"], task["route"], task["task_id"], task["upstream"]) == (
        "team-a",
        "qwen-image-plus",
        "tasks.get",
        task_id,
        "sim",
    )

    everything = gw.stdout_text() + gw.stderr_text() + ledger.read_text()
    for secret in (KEY_A, KEY_B, UPSTREAM_KEY, WRONG_KEY, MARKER, "Bearer"):
        assert secret not in everything, secret


def test_log_prompts_logs_a_truncated_prompt(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(
        yaml_text=gateway_yaml(sim.url, tmp_path / "s.db").replace(
            "  port: 0", "  port: 0\n  log_prompts: true"
        )
    )
    prompt = MARKER + " " + "x" * 400
    r = requests.post(
        gw.url + MM, json=body(prompt), timeout=10, headers={"Authorization": f"Bearer {KEY_A}"}
    )
    assert r.status_code == 200
    (line,) = gw.log_lines()
    assert line["prompt"] == prompt[:200]
    assert KEY_A not in gw.access.getvalue().decode()


def test_ledger_survives_restarts_torn_lines_and_rotation(
    launcher: Launcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.jsonl"
    server = f"  usage_log: {ledger}\n"
    gw = launcher.start(server=server)
    assert gw.generate(KEY_A).status_code == 200
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0
    with ledger.open("ab") as f:  # a crash in the middle of a line
        f.write(b'{"ts": "2026-01-01T00:00')

    gw = launcher.start(server=server)
    assert gw.generate(KEY_A, n=3).status_code == 200
    raw = ledger.read_text().splitlines()
    assert len(raw) == 3  # appended, not truncated; the torn line ended on its own
    assert json.loads(raw[0])["images"] == 1
    with pytest.raises(ValueError):
        json.loads(raw[1])
    assert json.loads(raw[2])["images"] == 3

    os.rename(ledger, tmp_path / "usage.jsonl.1")  # rotation: rename, no signal needed
    assert gw.generate(KEY_A, n=2).status_code == 200
    assert [json.loads(x)["images"] for x in ledger.read_text().splitlines()] == [2]
    assert len((tmp_path / "usage.jsonl.1").read_text().splitlines()) == 3
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0


def test_a_failing_ledger_never_fails_the_request_nor_loses_the_count(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="proxy.ops.ledger")
    # /dev/full accepts the open and fails every write with ENOSPC.
    gw = start_gateway(
        yaml_text=gateway_yaml(sim.url, tmp_path / "s.db").replace(
            "  port: 0", "  port: 0\n  usage_log: /dev/full"
        )
    )
    r = requests.post(
        gw.url + MM, json=body(n=2), timeout=10, headers={"Authorization": f"Bearer {KEY_A}"}
    )
    assert r.status_code == 200
    assert gw.images("team-a", "qwen-image-2.0") == 2
    wait_for(lambda: gw.metric("dashscope_proxy_usage_log_errors_total") == 1, 5, "the error")
    time.sleep(0.05)
    lost = [r.getMessage() for r in caplog.records if "lost line" in r.getMessage()]
    assert len(lost) == 1 and '"key":"team-a"' in lost[0] and '"images":2' in lost[0]
    assert KEY_A not in lost[0]


def test_a_ledger_that_cannot_be_opened_stops_startup_cleanly(launcher: Launcher) -> None:
    launcher.config_path.write_text(launcher.yaml(server="  usage_log: /proc/none/usage.jsonl\n"))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(launcher.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 1
    assert "cannot start: [Errno 2] usage ledger /proc/none/usage.jsonl" in done.stderr
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr
