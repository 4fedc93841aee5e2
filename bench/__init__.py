"""The gateway's benchmark: `python -m bench` (see docs/performance.md).

upstream.py         a fast DashScope-shaped upstream (raw asyncio, canned answers)
reference_proxy.py  the yardstick: the smallest correct aiohttp passthrough
loadgen.py          wrk when installed, else a lean Python HTTP/1.1 client process
procs.py            starting processes pinned to cores; CPU, RSS, fds from /proc
core.py             the environment (`Bench`) and figures (`Metric`: median/min/max, ratio)
scenarios.py        rps, latency, hold, relay, b64, soak, workers (and reconciler)
reconcile.py        reconciler: the background poller over thousands of outstanding tasks
report.py           the table and the JSON document

Standalone tools kept beside it: load_hold.py (held requests against the simulator),
ops_metrics_cost.py (multiprocess metrics cost), ops_reload.py (reload under load).
"""
