"""Demo traffic for `docker compose up`: a few requests a second through the gateway,
so the Grafana dashboard has something to show. Standard library only.

Two teams, a few models, the occasional throttled, failing or slow request
(simulator fault directives in the prompt) and a denied model.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.request

GATEWAY = os.environ.get("GATEWAY_URL", "http://gateway:8080")
KEYS = {"team-a": os.environ["TEAM_A_KEY"], "team-b": os.environ["TEAM_B_KEY"]}
MODELS = [("qwen-image-2.0", "1024*1024"), ("qwen-image-2.0-pro", "1328*1328"),
          ("wan2.6-t2i", "1280*1280"), ("wanx-v1", "1024*1024")]
PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a paper boat",
           "[sim:error=429] throttled", "[sim:error=500] failing", "[sim:slow=8] slow"]
WEIGHTS = [30, 30, 30, 4, 3, 3]


def one() -> None:
    team = random.choice(list(KEYS))
    model, size = random.choice(MODELS)
    prompt = random.choices(PROMPTS, WEIGHTS)[0]
    body = {"model": model, "parameters": {"size": size, "n": random.choice([1, 1, 2, 4])},
            "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]}}
    req = urllib.request.Request(
        GATEWAY + "/api/v1/services/aigc/multimodal-generation/generation",
        data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {KEYS[team]}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:  # the gateway restarting, reloading, draining
        status = f"error ({exc})"
    print(f"{team} {model} -> {status}", flush=True)


def main() -> None:
    # PID 1 in its container: without a handler SIGTERM would be ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        one()
        time.sleep(random.uniform(0.1, 0.6))


if __name__ == "__main__":
    main()
