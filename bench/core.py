"""The benchmark's environment: the processes under test, the load generator, the figures.

`Bench` owns a scratch directory, the fast upstream, and starts the gateway
(as a real `python -m proxy --config ...` process, with auth, metering, metrics
and the access log on), the reference passthrough and nginx on demand. `load`
runs one load-generator pass (wrk when installed, else `bench.loadgen`) pinned
away from the process under test. `Metric` holds one figure's per-run values
per target and reduces them to median/min/max and a ratio to the reference
measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loadgen, procs
from .procs import Proc

UPSTREAM_KEY = "sk-bench-upstream-0000"
GATEWAY_KEY = "gw-bench-team-key-0001"
MODEL = "qwen-image-plus"
SYNC_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
SYNC_BODY = json.dumps(
    {
        "model": MODEL,
        "input": {"messages": [{"role": "user", "content": [{"text": "a red fox in the snow"}]}]},
        "parameters": {"size": "1328*1328", "n": 1, "watermark": False},
    }
)
RELAY_BYTES = 6 * 1024 * 1024
IMAGE_BYTES = 3 * 1024 * 1024


# Every limit on, none reached: the bench pays for checking them (the bench key's
# `limits:` and the price table, which spend limits need).
LIMITS = """    limits:
      requests_per_minute: 100000000
      concurrent_requests: 1000000
      images_per_day: 1000000000
      images_per_month: 1000000000
      spend_per_day: 1000000000
      spend_per_month: 1000000000
pricing:
  currency: USD
  models:
    "qwen-image*":
      per_image: 0.03
    "wan2.6-*":
      per_image: 0.03
"""
# What `gateway_yaml(without=...)` can turn off.
FEATURES = ("access_log", "usage_log", "limits")


def sync_request(key: str = GATEWAY_KEY, **headers: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "path": SYNC_PATH,
        "body": SYNC_BODY,
        "headers": {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **headers,
        },
    }


@dataclass
class Settings:
    quick: bool
    runs: int
    duration: float
    hold_count: int
    hold_seconds: float
    soak_seconds: float
    soak_rate: float
    reconcile_tasks: int
    use_wrk: bool
    use_nginx: bool


@dataclass
class Metric:
    """One figure: per-run values for each target, reduced to median [min, max]."""

    name: str
    unit: str
    values: dict[str, list[float]] = field(default_factory=dict)
    # Ratio gateway/`ratio_to`, computed per run (same-run pairs), then its median.
    ratio_to: str | None = "reference"
    higher_is_better: bool = True
    target: str = ""
    # Decides `met` from (gateway median, ratio median); None = no target.
    check: Callable[[float, float | None], bool] | None = None

    def add(self, target: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(target, []).append(float(value))

    def summary(self, target: str) -> dict[str, float] | None:
        vs = self.values.get(target)
        if not vs:
            return None
        return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "runs": len(vs)}

    def ratios(self) -> list[float]:
        gw, ref = self.values.get("gateway", []), self.values.get(self.ratio_to or "", [])
        return [g / r for g, r in zip(gw, ref, strict=False) if r]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "unit": self.unit,
            "target": self.target,
            "values": {t: {**(self.summary(t) or {}), "all": v} for t, v in self.values.items()},
        }
        ratios = self.ratios()
        ratio = statistics.median(ratios) if ratios else None
        if self.ratio_to and ratios:
            out["ratio"] = {
                "to": self.ratio_to,
                "median": ratio,
                "min": min(ratios),
                "max": max(ratios),
            }
        gw = self.summary("gateway")
        if self.check is not None and gw is not None:
            out["met"] = bool(self.check(gw["median"], ratio))
        return out


@dataclass
class ScenarioResult:
    name: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    def metric(self, name: str, unit: str, **kw: Any) -> Metric:
        m = Metric(name, unit, **kw)
        self.metrics.append(m)
        return m

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": "skipped" if self.skipped else "ok",
            "skipped_reason": self.skipped,
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
            "metrics": [m.to_json() for m in self.metrics],
        }


class Sampler:
    """Samples a process's RSS (and fds) on a thread while a load runs."""

    def __init__(self, proc: Proc, interval: float = 0.1, fds: bool = False) -> None:
        self.proc, self.interval, self.with_fds = proc, interval, fds
        self.rss: list[int] = []
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss.append(self.proc.rss_kb())
            if self.with_fds:
                self.fds.append(self.proc.fds())
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    """The processes under test and how to load them."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.sut_cpus, self.load_cpus, self.pinning = procs.cpu_plan()
        self.tmp = Path(tempfile.mkdtemp(prefix="dashscope-bench-"))
        self._stack = contextlib.ExitStack()
        self._n = 0
        self.upstream_port = procs.free_port()
        self.upstream = self._stack.enter_context(
            procs.running(
                "upstream",
                [
                    procs.python(),
                    "-m",
                    "bench.upstream",
                    "--port",
                    str(self.upstream_port),
                    "--image-bytes",
                    str(IMAGE_BYTES),
                ],
                self.upstream_port,
                self.load_cpus,
                self.tmp,
            )
        )

    def close(self) -> None:
        self._stack.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def wrk(self) -> bool:
        return self.s.use_wrk and loadgen.wrk_available()

    @property
    def nginx_available(self) -> bool:
        return self.s.use_nginx and shutil.which("nginx") is not None

    # ------------------------------------------------------------------ processes

    def gateway_yaml(
        self,
        port: int,
        workers: int = 1,
        tasks: dict[str, object] | None = None,
        state: Path | None = None,
        extra: str = "",
        without: Collection[str] = (),
    ) -> str:
        """The gateway's config; `tasks`: its `tasks:` section, `state`: its state file,
        `extra`: more sections (YAML text); `without`: features turned off, of
        `FEATURES` (what each costs, in the `instructions` scenario)."""
        unknown = set(without) - set(FEATURES)
        assert not unknown, unknown
        n = self._n = self._n + 1
        teams = "\n".join(
            f'  - name: team-{i:02d}\n    key_sha256: "{i:064x}"\n'
            f'    models: ["qwen-image*", "wan2.6-*"]'
            for i in range(1, 9)
        )
        section = "".join(f"\n  {k}: {json.dumps(v)}" for k, v in (tasks or {}).items())
        return (
            f"""
server:
  host: 127.0.0.1
  port: {port}
  workers: {workers}
  access_log: {"false" if "access_log" in without else "true"}
  usage_log: {"null" if "usage_log" in without else self.usage_log(n)}
upstreams:
  - name: bench
    base_url: http://127.0.0.1:{self.upstream_port}/api/v1
    api_key: {UPSTREAM_KEY}
    timeouts: {{connect: 10, read: 120, total: 120}}
keys:
{teams}
  - name: bench
    key: {GATEWAY_KEY}
{"" if "limits" in without else LIMITS}state:
  path: {state or self.tmp / f"state-{n}.db"}
"""
            + (f"tasks:{section}\n" if section else "")
            + extra
        )

    def usage_log(self, n: int) -> Path:
        return self.tmp / f"usage-{n}.jsonl"

    @contextlib.contextmanager
    def gateway(
        self,
        workers: int = 1,
        pinned: bool = True,
        tasks: dict[str, object] | None = None,
        state: Path | None = None,
        extra: str = "",
        without: Collection[str] = (),
        wrap: list[str] | None = None,
    ) -> Iterator[Proc]:
        """The gateway as a real process; its access log (stdout) goes to /dev/null.
        `proc.extra["usage_log"]` is its usage ledger. `wrap`: a command it runs under
        (valgrind), which may take a minute to start it."""
        port = procs.free_port()
        cfg = self.tmp / f"gateway-{port}.yaml"
        cfg.write_text(self.gateway_yaml(port, workers, tasks, state, extra, without))
        usage = self.usage_log(self._n)
        with procs.running(
            "gateway",
            [*(wrap or []), procs.python(), "-m", "proxy", "--config", str(cfg)],
            port,
            self.sut_cpus if pinned else None,
            self.tmp,
            timeout=120.0 if wrap else 20.0,
        ) as proc:
            proc.extra["usage_log"] = usage
            yield proc

    @contextlib.contextmanager
    def reference(self, wrap: list[str] | None = None) -> Iterator[Proc]:
        port = procs.free_port()
        with procs.running(
            "reference",
            [
                *(wrap or []),
                procs.python(),
                "-m",
                "bench.reference_proxy",
                "--port",
                str(port),
                "--upstream",
                f"http://127.0.0.1:{self.upstream_port}",
                "--key",
                UPSTREAM_KEY,
            ],
            port,
            self.sut_cpus,
            self.tmp,
            timeout=120.0 if wrap else 20.0,
        ) as proc:
            yield proc

    @contextlib.contextmanager
    def nginx(self) -> Iterator[Proc | None]:
        if not self.nginx_available:
            yield None
            return
        port = procs.free_port()
        root = self.tmp / f"nginx-{port}"
        root.mkdir()
        conf = root / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  client_max_body_size 64m;
  upstream up {{ server 127.0.0.1:{self.upstream_port}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {UPSTREAM_KEY}";
      proxy_read_timeout 120s;
      proxy_buffering off;  # stream like the gateway (no temp files for 6 MiB bodies)
    }}
  }}
}}
""")
        with procs.running(
            "nginx", ["nginx", "-p", str(root), "-c", str(conf)], port, self.sut_cpus, self.tmp
        ) as proc:
            yield proc

    # ----------------------------------------------------------------------- load

    def load(
        self,
        port: int,
        requests: list[dict[str, Any]],
        *,
        connections: int,
        duration: float | None = None,
        mode: str = "closed",
        rate: float | None = None,
        count: int | None = None,
        warmup: float | None = None,
        timeout: float = 60.0,
        cpus: set[int] | None | str = "load",
    ) -> dict[str, Any]:
        """One load-generator pass against 127.0.0.1:`port`."""
        pin = self.load_cpus if cpus == "load" else cpus
        assert not isinstance(pin, str)
        spec: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "requests": requests,
            "mode": mode,
            "connections": connections,
            "timeout": timeout,
            "duration": duration if duration is not None else self.s.duration,
            "warmup": warmup or 0.0,
            "rate": rate,
            "count": count,
        }
        if mode == "closed" and len(requests) == 1 and self.wrk:
            return loadgen.run_wrk(spec, pin)
        path = self.tmp / f"load-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        try:
            done = subprocess.run(
                [procs.python(), "-m", "bench.loadgen", str(path)],
                capture_output=True,
                cwd=procs.REPO,
                text=True,
                check=False,
                timeout=spec["duration"] + spec["warmup"] + timeout + 60,
                preexec_fn=lambda: procs._preexec(pin),
            )
        finally:
            path.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed: {done.stderr[-1500:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def warm(
        self, port: int, requests: list[dict[str, Any]] | None = None, connections: int = 8
    ) -> None:
        """A short pass so connection pools, caches and code paths are warm."""
        self.load(
            port,
            requests or [sync_request()],
            connections=connections,
            duration=0.5 if self.s.quick else 1.0,
            warmup=0.0,
            mode="rate",
            rate=2000.0,
        )


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.splitlines()
            if ln.startswith("model name")
        ]
        info["cpu_model"] = models[0] if models else "unknown"
    import os
    import platform
    import sys

    info["nproc"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 1024 / 1024, 1)
    info["loadavg"] = os.getloadavg()
    info["python"] = sys.version.split()[0]
    info["kernel"] = platform.release()
    for mod in ("aiohttp", "uvloop", "orjson"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            info[mod] = None
    return info
