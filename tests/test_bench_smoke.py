"""The benchmark cannot silently rot: `python -m bench --quick` runs end to end.

No timing assertions (CI machines are shared and noisy): only that every
scenario ran or was skipped with a reason, that the table was printed and the
JSON written, and that no scenario crashed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bench.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_produces_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["machine"]["nproc"] >= 1
    assert set(doc["scenarios"]) == set(SCENARIOS)
    for name, scenario in doc["scenarios"].items():
        if scenario["status"] == "skipped":
            reason = scenario["skipped_reason"] or ""
            assert reason and not reason.startswith("FAILED"), (name, reason)
        else:
            assert scenario["status"] == "ok", name
            assert scenario["metrics"], name
            for metric in scenario["metrics"]:
                assert metric["values"].get("gateway"), (name, metric["name"])
    # Not a timing: the reconciler row fails unless every task was metered exactly once.
    reconciler = doc["scenarios"]["reconciler"]
    assert reconciler["status"] == "ok", reconciler
    (metered,) = [m for m in reconciler["metrics"] if m["name"].startswith("images metered")]
    assert metered["met"] is True, metered
    table = done.stdout
    assert re.search(r"^\| scenario +\| metric ", table, re.MULTILINE), table[-3000:]
    for name in SCENARIOS:
        assert f"| {name} " in table, name


def test_every_instructions_variant_has_a_table_column() -> None:
    # A variant without a column would be measured and never printed.
    from bench.instructions import VARIANTS
    from bench.report import COLUMNS

    assert set(VARIANTS) <= set(COLUMNS)
