"""A bounded smoke of `bench/load_hold.py`: 200 concurrent requests held 1 s by a slow upstream
all succeed through a real gateway process. The full run (thousands, seconds) is a benchmark
figure, not a test: `python -m bench.load_hold`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.load_hold import run


def test_two_hundred_requests_held_for_a_second(tmp_path: Path) -> None:
    result = asyncio.run(run(requests=200, hold=1.0, workdir=tmp_path))
    assert result["succeeded"] == 200, result
    assert result["latency_p50_seconds"] >= 1.0  # really held by the upstream
    assert result["gateway_rss_peak_mib"] > 0 and result["gateway_peak_fds"] > 0
