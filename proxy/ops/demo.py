"""`dashscope-proxy demo`: the simulator and the gateway in one process, no account needed.

Starts the bundled DashScope simulator on 127.0.0.1, a gateway in front of it
with a fresh demo key and local image storage (so answers carry the gateway's own
image links), and prints examples that work when pasted.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from proxy.config.parse import parse_config
from proxy.ops.server import install_fast_loop, serve
from proxy.simulator import SimSettings, create_sim_app

DEMO_CONFIG = """
server:
  host: {host}
  port: {port}
  access_log: true
  usage_log: {usage}
upstreams:
  - name: simulator
    base_url: http://127.0.0.1:{sim_port}/api/v1
    api_key: sk-sim-upstream
keys:
  - name: demo
    key: {key}
state:
  path: {state}
openai:
  default_response_format: url
storage:
  backend: local
  path: {images}
  signing_key: {signing_key}
"""


def examples(base: str, key: str, python: str | None = None) -> str:
    """The banner: pasteable commands that run as printed, with this interpreter (the
    environment the demo was installed into), not whatever `python` is on PATH."""
    py = shlex.quote(python or sys.executable)
    return f"""
dashscope-proxy demo is running.

  gateway   {base}        (DashScope API at {base}/api/v1, OpenAI API at {base}/v1)
  demo key  {key}
  metrics   {base}/metrics
  images    kept by the gateway: answers link to {base}/images/...

Try it (paste into another terminal):

  # DashScope-native, synchronous qwen-image-2.0-pro, two images
  curl -s {base}/api/v1/services/aigc/multimodal-generation/generation \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model":"qwen-image-2.0-pro","input":{{"messages":[{{"role":"user","content":[{{"text":"a red fox in snow"}}]}}]}},"parameters":{{"n":2,"size":"1024*1024"}}}}'

  # The official DashScope SDK, unchanged but for the base URL and the key
  # (the SDK examples need the SDKs: {py} -m pip install dashscope openai)
  {py} - <<'PY'
import dashscope
from dashscope import ImageSynthesis
dashscope.base_http_api_url = "{base}/api/v1"
rsp = ImageSynthesis.call(api_key="{key}", model="qwen-image-plus", prompt="a lighthouse at dusk", size="1328*1328")
print(rsp.status_code, [r.url for r in rsp.output.results])
PY

  # The OpenAI SDK
  {py} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
img = client.images.generate(model="qwen-image-2.0", prompt="a paper boat", size="1024x1024", response_format="url")
print(img.data[0].url)
PY

  # Images counted per key and model
  curl -s {base}/metrics | grep dashscope_proxy_images_total

Ctrl-C stops both.
"""


async def _run(host: str, port: int, sim_port: int) -> int:
    key = "sk-demo-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="dashscope-proxy-demo-") as tmp:
        sim = web.AppRunner(
            create_sim_app(
                SimSettings(pending_seconds=1.0, running_seconds=2.0, sync_delay_seconds=0.5)
            ),
            access_log=None,
        )
        await sim.setup()
        await web.TCPSite(sim, "127.0.0.1", sim_port).start()
        config = parse_config(
            DEMO_CONFIG.format(
                host=host,
                port=port,
                sim_port=sim_port,
                key=key,
                state=Path(tmp) / "state.db",
                usage=Path(tmp) / "usage.jsonl",
                images=Path(tmp) / "images",
                # Per run: the demo's links work while it runs, like its key.
                signing_key=secrets.token_hex(16),
            ),
            {},
        )
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        try:
            return await serve(config, on_ready=lambda _: print(examples(base, key), flush=True))
        finally:
            await sim.cleanup()


def run_demo(host: str, port: int, sim_port: int) -> int:
    install_fast_loop()
    try:
        return asyncio.run(_run(host, port, sim_port))
    except OSError as exc:
        print(f"demo: cannot listen ({exc.strerror}); try --port and --sim-port", file=sys.stderr)
        return 1
