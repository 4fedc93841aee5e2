"""`dashscope-proxy demo`: starts, prints a key and examples that work when pasted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def demo() -> Iterator[tuple[str, str]]:
    port, sim_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port), "--sim-port", str(sim_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C" in line:
            break
    text = "".join(lines)
    try:
        assert "demo key" in text, text
        yield text, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(15) == 0
        finally:
            proc.kill()


def _blocks(text: str) -> tuple[list[str], list[str]]:
    """The curl commands and python heredoc snippets printed by the demo."""
    curls = [
        m.replace("\\\n", " ") for m in re.findall(r"(curl -s .*?(?:'\n|\n\n))", text, flags=re.S)
    ]
    # Whole heredocs, interpreter included: they are run exactly as pasted.
    pys = re.findall(r"^  (\S+ - <<'PY'\n.*?\nPY)$", text, flags=re.S | re.M)
    return curls, pys


def test_demo_examples_work_when_pasted(demo: tuple[str, str]) -> None:
    text, base = demo
    key = re.search(r"demo key\s+(\S+)", text).group(1)  # type: ignore[union-attr]
    assert requests.get(base + "/readyz", timeout=5).status_code == 200
    curls, pys = _blocks(text)
    assert len(curls) >= 2 and len(pys) == 2, text
    generation = subprocess.run(
        ["bash", "-c", curls[0]], capture_output=True, text=True, timeout=30
    )
    assert '"image_count":2' in generation.stdout.replace(" ", ""), generation.stdout
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for snippet in pys:
        # The interpreter is the one the demo runs on, not a bare `python` from PATH.
        assert snippet.startswith(sys.executable + " - "), snippet
        out = subprocess.run(
            ["bash", "-c", snippet], capture_output=True, text=True, timeout=60, env=env
        )
        assert out.returncode == 0, out.stderr
        assert "http" in out.stdout, out.stdout
        # Storage is on in the demo: the images are the gateway's own links.
        link = re.search(r"http://\S+/images/\S+?(?=['\],\s])", out.stdout)
        assert link and link.group(0).startswith(base + "/images/"), out.stdout
        assert requests.get(link.group(0), timeout=5).content.startswith(b"\x89PNG")
    metrics = subprocess.run(
        ["bash", "-c", curls[-1]], capture_output=True, text=True, timeout=30
    ).stdout
    assert 'dashscope_proxy_images_total{key="demo",model="qwen-image-2.0-pro"} 2.0' in metrics
    assert key not in metrics
