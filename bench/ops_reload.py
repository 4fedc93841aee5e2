"""How fast operations take effect on a real gateway process.

    python -m bench.ops_reload [--rounds 5] [--keys 1000]

Starts the simulator and `python -m proxy --config PATH` (default file watching,
1 s), then measures, over several rounds:
- file edit -> the new key is accepted (the watcher's poll + settle + parse),
- SIGHUP -> the new key is accepted,
- SIGTERM on an idle gateway -> process exit;
with a config holding `--keys` keys (parse time grows with the file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MM = "/api/v1/services/aigc/multimodal-generation/generation"
BODY = (
    b'{"model":"qwen-image-2.0","input":{"messages":[{"role":"user","content":'
    b'[{"text":"a fox"}]}]}}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(sim_port: int, keys: int, tmp: Path, extra_key: str | None) -> str:
    lines = [
        f'  - name: team-{i}\n    key_sha256: "{hashlib.sha256(str(i).encode()).hexdigest()}"'
        for i in range(keys)
    ]
    if extra_key:
        lines.append(f"  - name: new-team\n    key: {extra_key}")
    return (
        f"server: {{host: 127.0.0.1, port: 0, usage_log: {tmp}/usage.jsonl}}\n"
        "upstreams:\n  - name: sim\n"
        f"    base_url: http://127.0.0.1:{sim_port}/api/v1\n    api_key: sk-sim-upstream\n"
        f"keys:\n" + "\n".join(lines) + f"\nstate: {{path: {tmp}/state.db}}\n"
    )


def status(url: str, key: str) -> int:
    req = urllib.request.Request(
        url + MM,
        data=BODY,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def wait_until(check: object, timeout: float = 20) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if check():  # type: ignore[operator]
            return time.perf_counter() - t0
        time.sleep(0.01)
    raise TimeoutError


def start_gateway(path: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    for raw in proc.stderr:
        m = re.search(rb"listening on (http://\S+)", raw)
        if m:
            os.set_blocking(proc.stderr.fileno(), False)
            return proc, m.group(1).decode()
    raise RuntimeError("gateway did not start")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--keys", type=int, default=1000)
    args = p.parse_args()
    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "proxy.simulator", "--port", str(sim_port), "--zero-delay"],
        stdout=subprocess.DEVNULL,
    )
    file_s: list[float] = []
    hup_s: list[float] = []
    stop_s: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            path = tmp / "config.yaml"
            for r in range(args.rounds):
                path.write_text(config(sim_port, args.keys, tmp, None))
                gw, url = start_gateway(path)
                key = f"gw-new-team-key-{r:04d}-file"
                tmp_file = tmp / "config.yaml.tmp"
                tmp_file.write_text(config(sim_port, args.keys, tmp, key))
                os.replace(tmp_file, path)
                file_s.append(wait_until(lambda k=key, u=url: status(u, k) == 200))
                key = f"gw-new-team-key-{r:04d}-hup"
                tmp_file.write_text(config(sim_port, args.keys, tmp, key))
                os.replace(tmp_file, path)
                gw.send_signal(signal.SIGHUP)
                hup_s.append(wait_until(lambda k=key, u=url: status(u, k) == 200))
                t0 = time.perf_counter()
                gw.send_signal(signal.SIGTERM)
                assert gw.wait(30) == 0
                stop_s.append(time.perf_counter() - t0)
    finally:
        sim.terminate()
        sim.wait(10)
    print(f"{args.keys} keys in the config, {args.rounds} rounds (median [min..max] seconds)")
    for name, xs in (
        ("file edit -> new key works", file_s),
        ("SIGHUP -> new key works", hup_s),
        ("SIGTERM (idle) -> exit 0", stop_s),
    ):
        print(f"  {name:<28} {statistics.median(xs):6.3f} [{min(xs):.3f}..{max(xs):.3f}]")


if __name__ == "__main__":
    main()
