"""What the metrics cost per request, single process vs `server.workers` (multiprocess mode).

    python -m bench.ops_metrics_cost [--requests 200000]

Runs the exact metric operations the gateway does for one metered request
(in-flight gauge up and down, request counter, duration histogram, image
counter) in two fresh interpreters: one plain, one with
PROMETHEUS_MULTIPROC_DIR set as the supervisor sets it for workers. Prints
microseconds per request for each and the cost of one /metrics scrape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, os
from prometheus_client import CollectorRegistry, generate_latest
from proxy.metrics import Metrics
n = int(sys.argv[1])
mp = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
m = Metrics(CollectorRegistry(), mp)
keys = [f"team-{i}" for i in range(8)]
models = ["qwen-image-2.0", "qwen-image-plus", "wan2.6-t2i", "other"]
def one(i):
    g = m.inflight_gauge("multimodal-generation")
    g.inc()
    key, model = keys[i % 8], models[i % 4]
    m.image_counter(key, model).inc(1)
    m.count_request("multimodal-generation", key, model, 200, 0.8)
    g.dec()
for i in range(2000):
    one(i)
t0 = time.perf_counter()
for i in range(n):
    one(i)
per_request = (time.perf_counter() - t0) / n
t0 = time.perf_counter()
for _ in range(20):
    body = generate_latest(m.exposition)
scrape = (time.perf_counter() - t0) / 20
print(json.dumps({"us_per_request": per_request * 1e6, "scrape_ms": scrape * 1e3,
                  "scrape_bytes": len(body)}))
"""


def run(n: int, multiprocess: bool) -> dict[str, float]:
    env = dict(os.environ)  # noqa: TID251 - a benchmark driver, not the gateway
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = tmp
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(n)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=200_000)
    args = p.parse_args()
    single = run(args.requests, False)
    multi = run(args.requests, True)
    print(f"{'mode':<28}{'us/request':>12}{'scrape ms':>12}")
    for name, r in (("single process", single), ("workers (multiprocess mode)", multi)):
        print(f"{name:<28}{r['us_per_request']:>12.2f}{r['scrape_ms']:>12.2f}")
    extra = multi["us_per_request"] - single["us_per_request"]
    print(f"extra per request with workers: {extra:.2f} us")


if __name__ == "__main__":
    main()
