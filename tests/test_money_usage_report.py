"""`dashscope-proxy usage`: the chargeback report over the usage log, run as the command.

Its totals over several rotated and gzipped files equal the gateway's own metrics; the CSV
and JSON formats hold exactly the documented columns; `--since` is inclusive and `--until`
exclusive in UTC; unmetered answers and malformed lines are reported, never fatal.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dashscope
import pytest
from dashscope import MultiModalConversation

from tests.conftest import KEY_A, KEY_B, GatewayFactory
from tests.support import Live
from tests.test_money_pricing import PRO, config

REPO = Path(__file__).resolve().parent.parent


def usage(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "usage", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )


def generate(key: str, model: str, size: str, n: int) -> None:
    rsp = MultiModalConversation.call(
        api_key=key,
        model=model,
        messages=[{"role": "user", "content": [{"text": "a lighthouse"}]}],
        n=n,
        size=size,
    )
    assert rsp.status_code == 200, rsp


def metric_sum(gw: Any, name: str) -> float:
    return sum(
        s.value
        for family in gw.registry.collect()
        for s in family.samples
        if s.name == name and s.labels.get("key") != "anonymous"
    )


def test_totals_over_rotated_and_gzipped_files_match_the_metrics(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = config(sim, tmp_path)
    (tmp_path / "gateway.yaml").write_text(text)
    gw = start_gateway(yaml_text=text)
    monkeypatch.setattr(dashscope, "base_http_api_url", gw.api)
    log = tmp_path / "usage.jsonl"
    # Three batches, rotated as logrotate does between them: .1 plain, .2.gz compressed.
    generate(KEY_A, PRO, "1024*1024", 2)
    generate(KEY_B, "wan2.6-t2i", "1440*1440", 1)
    os.rename(log, tmp_path / "usage.jsonl.2")
    generate(KEY_A, PRO, "2048*2048", 3)
    generate(KEY_A, "qwen-image-2.0", "1024*1024", 2)  # no price
    os.rename(log, tmp_path / "usage.jsonl.1")
    with open(tmp_path / "usage.jsonl.2", "rb") as src:
        (tmp_path / "usage.jsonl.2.gz").write_bytes(gzip.compress(src.read()))
    (tmp_path / "usage.jsonl.2").unlink()
    generate(KEY_B, PRO, "1024*1024", 1)
    assert sorted(p.name for p in tmp_path.glob("usage.jsonl*")) == [
        "usage.jsonl",
        "usage.jsonl.1",
        "usage.jsonl.2.gz",
    ]

    done = usage("--config", str(tmp_path / "gateway.yaml"), "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len(doc["files"]) == 3
    images = metric_sum(gw, "dashscope_proxy_images_total")
    cost = metric_sum(gw, "dashscope_proxy_cost_total")
    assert images == 2 + 1 + 3 + 2 + 1
    assert doc["total"]["images"] == images
    assert doc["total"]["cost"] == pytest.approx(cost)
    assert doc["total"]["unpriced_images"] == 2 and doc["total"]["currency"] == "USD"
    by = {(g["key"], g["model"]): g for g in doc["groups"]}
    assert by[("team-a", PRO)]["images"] == 5
    assert by[("team-a", PRO)]["cost"] == pytest.approx(2 * 0.04 + 3 * 0.075)
    assert by[("team-a", "qwen-image-2.0")]["unpriced_images"] == 2
    assert by[("team-b", "wan2.6-t2i")]["cost"] == pytest.approx(0.05)
    # The same through the environment instead of --config, as CSV per key.
    env = {**os.environ, "DASHSCOPE_PROXY_CONFIG": str(tmp_path / "gateway.yaml")}
    done = usage("--by", "key", "--format", "csv", env=env)
    assert done.returncode == 0, done.stderr
    table = list(csv.reader(io.StringIO(done.stdout)))
    assert table[0] == ["key", "images", "cost", "currency", "unpriced_images"]
    assert table[-1][:2] == ["total", str(int(images))]
    assert float(table[-1][2]) == pytest.approx(cost)


LINES = [
    # (ts, key, model, images, cost): around November's edges, and an unmetered answer.
    ("2026-10-31T23:59:59.999Z", "team-a", "m1", 1, 0.5),
    ("2026-11-01T00:00:00.000Z", "team-a", "m1", 2, 1.0),
    ("2026-11-15T12:00:00.000Z", "team-b", "m2", 4, None),
    ("2026-11-30T23:59:59.999Z", "team-a", "m2", 1, 0.25),
    ("2026-12-01T00:00:00.000Z", "team-a", "m1", 8, 4.0),
    ("2026-12-01T05:00:00+08:00", "team-b", "m2", 1, 0.1),  # an offset: UTC Nov 30, 21:00
]


def write_log(path: Path) -> None:
    out = []
    for ts, key, model, images, cost in LINES:
        line = {"ts": ts, "key": key, "model": model, "images": images, "cost": cost}
        line.update(currency="USD" if cost is not None else None, width=None, height=None)
        line.update(route="r", upstream="u", request_id="x", task_id=None)
        out.append(json.dumps(line, separators=(",", ":")))
    out.append(
        '{"ts":"2026-11-10T00:00:00.000Z","key":"team-a","model":"m1","images":null,'
        '"cost":null,"currency":null,"width":null,"height":null,"route":"r","upstream":"u",'
        '"request_id":"y","task_id":"t1","reason":"read_timeout"}'
    )
    out.append('{"ts":"2026-11-11T00:00:00.000Z","key":"team-a","mod')  # torn by a crash
    out.append('{"ts": "2026-11-12T00:00:00Z", "key": "team-a", "model": "m1", "images": -1}')
    out.append("")
    path.write_text("\n".join(out) + "\n")


def test_since_is_inclusive_until_exclusive_in_utc(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    write_log(log)
    done = usage(
        "--since",
        "2026-11-01",
        "--until",
        "2026-12-01",
        "--by",
        "day,key",
        "--format",
        "csv",
        str(log),
    )
    assert done.returncode == 0, done.stderr
    table = list(csv.reader(io.StringIO(done.stdout)))
    assert table == [
        ["day", "key", "images", "cost", "currency", "unpriced_images"],
        ["2026-11-01", "team-a", "2", "1", "USD", "0"],
        ["2026-11-15", "team-b", "4", "0", "", "4"],
        ["2026-11-30", "team-a", "1", "0.25", "USD", "0"],
        ["2026-11-30", "team-b", "1", "0.1", "USD", "0"],
        ["total", "", "8", "1.35", "USD", "4"],
    ]
    # Both bad lines are counted and located on stderr; the report still ran.
    assert "skipped 2 malformed line(s)" in done.stderr
    assert f"{log}:8" in done.stderr
    assert "1 unmetered answer(s)" in done.stderr


def test_json_and_table_formats_and_every_line_without_bounds(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    write_log(log)
    done = usage("--format", "json", "--by", "model", str(log))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["groups"] == [
        {"model": "m1", "images": 11, "cost": 5.5, "currency": "USD", "unpriced_images": 0},
        {"model": "m2", "images": 6, "cost": 0.35, "currency": "USD", "unpriced_images": 4},
    ]
    assert doc["total"] == {"images": 17, "cost": 5.85, "currency": "USD", "unpriced_images": 4}
    assert (doc["unmetered_answers"], doc["malformed_lines"]) == (1, 2)
    done = usage("--until", "2026-11-01", str(log))  # default --by key,model, a table
    assert done.returncode == 0, done.stderr
    rows = [r.split() for r in done.stdout.splitlines()]
    assert rows[0] == ["key", "model", "images", "cost", "currency", "unpriced_images"]
    assert ["team-a", "m1", "1", "0.5", "USD", "0"] in rows
    assert ["total", "1", "0.5", "USD", "0"] in rows


def test_the_command_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    done = usage("--since", "2026-11-31", str(tmp_path / "x"))
    assert done.returncode == 2 and "is not a date" in done.stderr
    done = usage("--by", "key,team", str(tmp_path / "x"))
    assert done.returncode == 2 and "--by takes distinct fields" in done.stderr
    done = usage(str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "no such file" in done.stderr
    off = tmp_path / "off.yaml"
    off.write_text("server:\n  usage_log: null\nupstreams:\n  - api_key: ${UNSET_SECRET}\n")
    done = usage("--config", str(off))
    assert done.returncode == 2 and "turns the usage log off" in done.stderr
    # Without a config: the default path, relative to where the command runs.
    done = usage(cwd=tmp_path)
    assert done.returncode == 1 and "no usage log at dashscope-proxy-usage.jsonl" in done.stderr
    write_log(tmp_path / "dashscope-proxy-usage.jsonl")
    done = usage("--format", "csv", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "total,,17,5.85,USD,4"
