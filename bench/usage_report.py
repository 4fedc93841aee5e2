"""The `usage` row: `dashscope-proxy usage` over a generated ~1 GB usage log.

What it shows: how fast the monthly chargeback report reads the ledger (lines per
second, end to end: gzip-free JSONL, `--by key,model,day --format json`), and that
its memory is bounded by its groups, not by the log: the report's peak RSS is
compared with an idle interpreter that only imports it, and with the log's size.

How: a ledger of realistic lines (8 keys, 4 models, 60 days, some unpriced, one in
a thousand unmetered) is written once to the bench's scratch directory, ~1 GB
(`--quick`: ~5 MB). Each run starts `python -m proxy usage` as a subprocess and
reads its peak RSS from `wait4` (the child's own rusage, so nothing else the bench
runs is mixed in). The report's totals must equal what was generated, or the row
fails.

    python -m bench --only usage
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .core import Bench, ScenarioResult
from .procs import REPO, python

FULL_BYTES = 1024**3
QUICK_BYTES = 5 * 1024**2
KEYS = [f"team-{i:02d}" for i in range(8)]
MODELS = [("qwen-image-3.0-pro", 0.04), ("qwen-image-2.0", None), ("wan2.6-t2i", 0.03)]
MODELS.append(("qwen-image-plus", 0.03))
DAYS = 60
START = 1_793_491_200  # 2026-11-01T00:00:00Z


def write_log(path: Path, target_bytes: int) -> tuple[int, int, int]:
    """Write a ledger of about `target_bytes`; (lines, images, unmetered) written."""
    lines = images = unmetered = 0
    written = 0
    chunk: list[str] = []
    with open(path, "w", encoding="ascii") as f:
        while written < target_bytes:
            i = lines
            key = KEYS[i % len(KEYS)]
            model, price = MODELS[(i // 8) % len(MODELS)]
            ts = START + (i * 7919) % (DAYS * 86400)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{i % 1000:03d}Z"
            n = 1 + i % 4
            if i % 1000 == 999:
                count, cost, cur, reason = "null", "null", "null", ',"reason":"read_timeout"'
                unmetered += 1
            else:
                count, reason = str(n), ""
                cost = "null" if price is None else repr(round(price * n, 9))
                cur = "null" if price is None else '"USD"'
                images += n
            line = (
                f'{{"ts":"{stamp}","key":"{key}","model":"{model}","images":{count},'
                f'"cost":{cost},"currency":{cur},"width":1024,"height":1024,'
                f'"route":"multimodal-generation","upstream":"intl",'
                f'"request_id":"{i:08x}-8c71-4dd8-88e7-63c6da2466d6","task_id":null{reason}}}\n'
            )
            chunk.append(line)
            written += len(line)
            lines += 1
            if len(chunk) >= 10_000:
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))
    return lines, images, unmetered


def run_measured(args: list[str]) -> tuple[float, int, bytes]:
    """Run `args`; (wall seconds, peak RSS in KiB of that child alone, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} exited {proc.returncode}")
    return seconds, int(usage.ru_maxrss), out


def usage_report(b: Bench) -> ScenarioResult:
    size = QUICK_BYTES if b.s.quick else FULL_BYTES
    res = ScenarioResult(
        "usage", f"dashscope-proxy usage over a {size / 1024**2:,.0f} MiB usage log"
    )
    speed = res.metric("report lines/s", "lines/s", ratio_to=None)
    rss = res.metric(
        "report peak RSS",
        "MiB",
        ratio_to="idle interpreter",
        higher_is_better=False,
        target="<= 1.5x idle interpreter",
        check=lambda _v, r: r is not None and r <= 1.5,
    )
    share = res.metric("peak RSS / log size", "%", ratio_to=None, higher_is_better=False)
    exact = res.metric(
        "images summed (1 = as generated)",
        "",
        ratio_to=None,
        target="= 1",
        check=lambda v, _r: v == 1,
    )
    log = b.tmp / "usage.jsonl"
    t0 = time.monotonic()
    lines, images, unmetered = write_log(log, size)
    log_mib = log.stat().st_size / 1024**2
    res.notes.append(
        f"{lines:,} lines ({log_mib:,.0f} MiB, {unmetered:,} unmetered) generated in "
        f"{time.monotonic() - t0:.1f} s; the report runs --by key,model,day --format json"
    )
    idle = [python(), "-c", "import proxy.ops.usage_report"]
    report = [python(), "-m", "proxy", "usage", "--by", "key,model,day", "--format", "json"]
    for _ in range(b.s.runs):
        _, idle_kb, _ = run_measured(idle)
        seconds, peak_kb, out = run_measured([*report, str(log)])
        doc = json.loads(out)
        speed.add("gateway", lines / seconds)
        rss.add("gateway", peak_kb / 1024)
        rss.add("idle interpreter", idle_kb / 1024)
        share.add("gateway", 100 * peak_kb / 1024 / log_mib)
        ok = (
            doc["total"]["images"] == images
            and doc["unmetered_answers"] == unmetered
            and doc["lines"] == lines
        )
        exact.add("gateway", 1.0 if ok else 0.0)
    return res
