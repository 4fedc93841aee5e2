"""Money and reloads, on a real gateway process: a changed price applies to the images metered
after the reload; the usage log is on by default, and a reload turns it on, off or moves it;
rotation (rename, logrotate's `create` + SIGHUP, `copytruncate`) never loses a line.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import ops_support
from tests.conftest import KEY_A
from tests.ops_support import GatewayProcess, Launcher, launching, wait_for, write_atomically
from tests.support import Live

COST = "dashscope_proxy_cost_total"
MODEL = "qwen-image-2.0"
RELOADS = "dashscope_proxy_config_reloads_total"


def pricing(per_image: float) -> str:
    return f"pricing:\n  currency: EUR\n  models:\n    '{MODEL}*': {{per_image: {per_image}}}\n"


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def make(gw: GatewayProcess, n: int = 1) -> None:
    r = gw.generate(KEY_A, model=MODEL, n=1)
    assert r.status_code == 200, r.text
    for _ in range(n - 1):
        assert gw.generate(KEY_A, model=MODEL).status_code == 200


def reload(launcher: Launcher, gw: GatewayProcess, text: str, count: int) -> None:
    write_atomically(launcher.config_path, text)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.metric(RELOADS, result="success") >= count, 10, f"reload {count}")


def test_a_reload_that_changes_a_price_applies_to_later_images(
    launcher: Launcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.jsonl"
    server = f"  usage_log: {ledger}\n"
    gw = launcher.start(pricing(0.2), server=server)
    make(gw, 2)
    assert gw.metric(COST, key="team-a", model=MODEL, currency="EUR") == pytest.approx(0.4)
    reload(launcher, gw, launcher.yaml(pricing(0.5), server=server), 1)
    make(gw, 1)
    assert gw.metric(COST, key="team-a", model=MODEL, currency="EUR") == pytest.approx(0.9)
    costs = [x["cost"] for x in lines(ledger)]
    assert costs == [0.2, 0.2, 0.5]
    assert gw.metric("dashscope_proxy_images_total", key="team-a", model=MODEL) == 3


def test_the_log_is_on_by_default_and_a_reload_moves_it_turns_it_off_and_on(
    launcher: Launcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No usage_log at all: the default, relative to where the gateway runs.
    text = launcher.yaml(pricing(0.1)).replace(
        f"  usage_log: {tmp_path / 'usage-default.jsonl'}\n", ""
    )
    assert "usage_log" not in text
    launcher.config_path.write_text(text)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setattr(ops_support, "REPO", workdir)  # the gateway process's cwd
    gw = GatewayProcess(launcher.config_path)
    launcher.running.append(gw)
    make(gw)
    default = workdir / "dashscope-proxy-usage.jsonl"
    assert [x["cost"] for x in lines(default)] == [0.1]

    moved = tmp_path / "elsewhere" / "usage.jsonl"  # a new directory is created
    reload(launcher, gw, launcher.yaml(pricing(0.1), server=f"  usage_log: {moved}\n"), 1)
    make(gw)
    assert len(lines(default)) == 1 and [x["images"] for x in lines(moved)] == [1]

    reload(launcher, gw, launcher.yaml(pricing(0.1), server="  usage_log: null\n"), 2)
    make(gw)
    assert len(lines(moved)) == 1  # off: nothing written
    assert len(lines(default)) == 1

    reload(launcher, gw, launcher.yaml(pricing(0.1), server=f"  usage_log: {moved}\n"), 3)
    make(gw)
    assert len(lines(moved)) == 2
    assert gw.metric("dashscope_proxy_usage_log_errors_total") == 0


def test_rotation_by_rename_create_and_copytruncate_loses_no_line(
    launcher: Launcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.jsonl"
    gw = launcher.start(pricing(0.1), server=f"  usage_log: {ledger}\n")
    make(gw)
    # logrotate `create`: rename, a new empty file, then SIGHUP (postrotate).
    os.rename(ledger, tmp_path / "usage.jsonl.1")
    ledger.touch()
    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.metric(RELOADS, result="success") >= 1, 10, "the SIGHUP reload")
    make(gw)
    # A plain rename and nothing else: the next line notices the inode changed.
    os.rename(ledger, tmp_path / "usage.jsonl.2")
    make(gw)
    # copytruncate: copy, then truncate in place; O_APPEND writes at the new end.
    (tmp_path / "usage.jsonl.3").write_bytes(ledger.read_bytes())
    with open(ledger, "r+b") as f:
        f.truncate(0)
    make(gw)
    counts = {name: len(lines(tmp_path / name)) for name in ("usage.jsonl.1", "usage.jsonl.2")}
    assert counts == {"usage.jsonl.1": 1, "usage.jsonl.2": 1}
    assert len(lines(tmp_path / "usage.jsonl.3")) == 1
    current = ledger.read_bytes()
    assert current.count(b"\n") == 1 and current.startswith(b'{"ts":"'), current[:80]
    assert gw.metric("dashscope_proxy_images_total", key="team-a", model=MODEL) == 4
