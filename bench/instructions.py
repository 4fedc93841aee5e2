"""The `instructions` rows: CPU per request as an instruction count, and what each feature costs.

CPU time on a shared machine moves by tens of percent between runs, so a change
of a few microseconds per request, or one feature's share of a request, cannot
be read from it. Instructions can: the process under test runs under
valgrind's callgrind, which counts every instruction it executes (all its
threads: the event loop, the usage ledger's and the state file's), the same
count for the same work whatever else the machine is doing (within about 1 %
between runs here: hash seeds, request ids, and the ticks of background work
during the pass). Kernel time (the system calls themselves) is not counted;
the CPU rows of `rps` keep it.

How: the process starts under callgrind with instrumentation off (start-up and
imports at a few times native speed), a warm-up pass runs, `callgrind_control
-i on` starts counting, exactly N requests go through on 16 keep-alive
connections (the Python load generator, `count` mode), and `callgrind_control
-d` dumps the count: instructions / N. Targets measured this way: the
reference passthrough, the gateway with every feature on, and the gateway with
one feature off at a time (access log, usage ledger, limits with the price
table they need) and with all three off: the differences are what each feature
costs per request, to the instruction. Each counts once per run (it repeats),
and the gateway also on new connections (`Connection: close`), against the
reference.

Needs valgrind (`apt-get install valgrind`); skipped without it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from .core import FEATURES, Bench, Metric, ScenarioResult, sync_request
from .procs import Proc

CONNECTIONS = 16
VARIANTS: dict[str, Collection[str]] = {
    "no access log": ("access_log",),
    "no usage ledger": ("usage_log",),
    "no limits or prices": ("limits",),
    "none of the three": FEATURES,
}


def _callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]


def counted(b: Bench, proc: Proc, out: Path, requests: int, close: bool = False) -> float:
    """Instructions `proc` (running under `_callgrind(out)`) executes per request, over
    exactly `requests` requests."""
    request = sync_request(Connection="close") if close else sync_request()
    warm = b.load(proc.port, [request], connections=CONNECTIONS, mode="count", count=100)
    if warm["failed"] or warm["errors"]:
        raise RuntimeError(f"{proc.name}: the warm-up failed: {warm}")
    _control(proc, "-z")  # nothing left over from an earlier pass
    _control(proc, "-i", "on")
    r = b.load(
        proc.port, [request], connections=CONNECTIONS, mode="count", count=requests, duration=600
    )
    dumps = set(out.parent.glob(out.name + ".*"))
    _control(proc, "-d")
    _control(proc, "-i", "off")
    (dump,) = set(out.parent.glob(out.name + ".*")) - dumps
    if r["failed"] or r["errors"] or r["requests"] != requests:
        raise RuntimeError(f"{proc.name}: {r['requests']} of {requests} answered: {r}")
    return _total(dump) / requests


def _control(proc: Proc, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(proc.pid)], check=True, capture_output=True, timeout=120
    )


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {dump}")


@contextmanager
def _under_callgrind(b: Bench, target: str) -> Iterator[Path]:
    """Where callgrind writes for `target`; removed afterwards."""
    out = b.tmp / f"callgrind-{target.replace(' ', '-')}.out"
    yield out
    for f in out.parent.glob(out.name + "*"):
        f.unlink()


def instructions(b: Bench) -> ScenarioResult:
    res = ScenarioResult("instructions", "instructions per request (callgrind), per feature")
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        res.skipped = "no valgrind (apt-get install valgrind)"
        return res
    per = res.metric(
        "instructions per request",
        "k",
        higher_is_better=False,
        target="<= 1.25x reference (the CPU target, counted)",
        check=lambda _g, r: r is not None and r <= 1.25,
    )
    fresh = res.metric(
        "instructions per request, new connection",
        "k",
        higher_is_better=False,
    )
    requests = 100 if b.s.quick else 2000
    variants = {} if b.s.quick else VARIANTS
    for _ in range(1 if b.s.quick else min(b.s.runs, 2)):
        with _under_callgrind(b, "reference") as out, b.reference(wrap=_callgrind(out)) as ref:
            per.add("reference", counted(b, ref, out, requests) / 1000)
            fresh.add("reference", counted(b, ref, out, requests // 2, close=True) / 1000)
        with _under_callgrind(b, "gateway") as out, b.gateway(wrap=_callgrind(out)) as gw:
            per.add("gateway", counted(b, gw, out, requests) / 1000)
            fresh.add("gateway", counted(b, gw, out, requests // 2, close=True) / 1000)
        for name, without in variants.items():
            with (
                _under_callgrind(b, name) as out,
                b.gateway(without=without, wrap=_callgrind(out)) as gw,
            ):
                per.add(name, counted(b, gw, out, requests) / 1000)
    _note_features(res, per)
    return res


def _note_features(res: ScenarioResult, per: Metric) -> None:
    full, ref = per.summary("gateway"), per.summary("reference")
    if not full or not ref:
        return
    parts = []
    for name in VARIANTS:
        off = per.summary(name)
        if off:
            cost = full["median"] - off["median"]
            share = cost / ref["median"]
            parts.append(f"{name}: {cost:,.0f}k ({share:.0%} of a reference request)")
    if parts:
        res.notes.append(
            "instructions each feature adds per request (every feature on minus it off): "
            + "; ".join(parts)
        )
