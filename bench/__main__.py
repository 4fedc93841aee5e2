"""`python -m bench`: run the scenarios, print the table, write the JSON.

    python -m bench                      every scenario, 3 runs each (~18 min)
    python -m bench --quick              seconds-long smoke (CI): tiny counts, no speed claims
    python -m bench --only rps,latency   a subset (names: rps latency hold relay b64 soak workers
                                         reconciler usage redis idempotency
                                         storage instructions)
    python -m bench --runs 5 --soak-seconds 600 --hold-seconds 10 --reconcile-tasks 50000

Run from the repository root (it starts `python -m proxy` and `python -m bench.*`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from . import report
from .core import Bench, ScenarioResult, Settings, machine
from .scenarios import SCENARIOS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke: 1 run, 1 s passes, small hold and soak",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help=f"scenario(s), comma-separated: {', '.join(SCENARIOS)}",
    )
    p.add_argument("--runs", type=int, help="measured runs per figure (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per load pass (default 5; quick 1)")
    p.add_argument("--hold-count", type=int, help="held requests (default 5000; quick 200)")
    p.add_argument("--hold-seconds", type=float, help="hold time (default 5; quick 1)")
    p.add_argument("--soak-seconds", type=float, help="soak length (default 30; quick 3)")
    p.add_argument("--soak-rate", type=float, default=300.0, help="soak requests/s")
    p.add_argument(
        "--reconcile-tasks",
        type=int,
        help="outstanding tasks reconciled (default 10000; quick 500)",
    )
    p.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    p.add_argument("--json", default="bench/results/latest.json", help="where to write JSON")
    args = p.parse_args(argv)
    only = [n.strip() for group in args.only for n in group.split(",") if n.strip()]
    unknown = [n for n in only if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.only = only or list(SCENARIOS)
    return args


def settings(args: argparse.Namespace) -> Settings:
    q = args.quick

    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if q else full)

    return Settings(
        quick=q,
        runs=int(pick(args.runs, 3, 1)),
        duration=pick(args.duration, 5, 1),
        hold_count=int(pick(args.hold_count, 5000, 200)),
        hold_seconds=pick(args.hold_seconds, 5, 1),
        soak_seconds=pick(args.soak_seconds, 30, 3),
        soak_rate=args.soak_rate,
        reconcile_tasks=int(pick(args.reconcile_tasks, 10_000, 500)),
        use_wrk=not args.no_wrk,
        use_nginx=not args.no_nginx,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    started = time.time()
    bench = Bench(s)
    results: list[ScenarioResult] = []
    failed = False
    try:
        print(
            f"dashscope-proxy benchmark: {bench.pinning}; load generator "
            f"{'wrk' if bench.wrk else 'python'}; nginx "
            f"{'yes' if bench.nginx_available else 'not installed/used'}",
            flush=True,
        )
        for name in args.only:
            t0 = time.monotonic()
            print(f"-- {name} ...", flush=True)
            try:
                res = SCENARIOS[name](bench)
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                failed = True
                traceback.print_exc()
                res = ScenarioResult(name, name, skipped=f"FAILED: {exc}"[:300])
            res.seconds = time.monotonic() - t0
            results.append(res)
    finally:
        bench.close()
    meta = {
        "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": s.quick,
        "runs": s.runs,
        "pinning": bench.pinning,
        "load_generator": "wrk" if bench.wrk else "python",
        "machine": machine(),
    }
    print()
    print(report.table(results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.document(results, meta), indent=2) + "\n")
    print(f"\nJSON: {out}  ({meta['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
