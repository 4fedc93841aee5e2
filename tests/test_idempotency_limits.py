"""`Idempotency-Key` at its edges: answers relayed in chunks are kept whole, answers above
`idempotency.max_answer_bytes` and requests whose process died are never run again (410),
and a Redis outage refuses keyed requests before anything runs."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import KEY_A, GatewayFactory
from tests.redis_support import RedisServer
from tests.resilience_support import MM, GatewayProcess, body, sim_model_calls, team_a_yaml
from tests.support import Live

HEADERS = {"Authorization": f"Bearer {KEY_A}"}


def post(url: str, payload: dict[str, Any], idem: str) -> requests.Response:
    return requests.post(
        url + MM, json=payload, headers=HEADERS | {"Idempotency-Key": idem}, timeout=30
    )


def test_a_large_answer_relayed_in_chunks_is_replayed_byte_for_byte(
    start_gateway: GatewayFactory, sim: Live
) -> None:
    gw = start_gateway()
    payload = body("a big answer [sim:pad=1000000]")  # streamed by the relay, not read whole
    first = post(gw.url, payload, "big-1")
    again = post(gw.url, payload, "big-1")
    assert first.status_code == again.status_code == 200
    assert len(first.content) > 900_000
    assert again.content == first.content and again.headers["Idempotency-Replayed"] == "true"
    assert sim_model_calls(sim) == 1


def test_an_answer_above_the_bound_is_never_run_again(
    start_gateway: GatewayFactory, sim: Live
) -> None:
    gw = start_gateway("idempotency: {max_answer_bytes: 4096}\n")
    for payload, idem in (
        (body("small json [sim:pad=8000]"), "s"),
        (body("[sim:pad=400000]"), "l"),
    ):
        first = post(gw.url, payload, idem)
        assert first.status_code == 200 and len(first.content) > 4096  # the client got it whole
        again = post(gw.url, payload, idem)
        assert again.status_code == 410, again.text
        assert again.json()["code"] == "IdempotencyAnswerNotKept"
        assert "max_answer_bytes" in again.json()["message"]
    assert sim_model_calls(sim) == 2


def test_a_process_killed_mid_request_leaves_409_then_410(sim: Live, tmp_path: Path) -> None:
    extra = "idempotency: {lease_seconds: 8}\n"
    state = f"  path: {tmp_path / 'state.db'}"
    text = team_a_yaml(sim.url, usage_log=tmp_path / "u.jsonl", state=state, extra=extra)
    text = text.replace(
        "    api_key:", "    timeouts: {connect: 1, read: 5, total: 5}\n    api_key:"
    )
    gw = GatewayProcess(text, tmp_path, "gw")
    payload = body("killed [sim:slow=1.5]")
    sender = threading.Thread(target=lambda: _swallow(lambda: post(gw.url, payload, "dead-1")))
    sender.start()
    deadline = time.monotonic() + 5
    while sim_model_calls(sim) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    claimed_at = time.monotonic()
    gw.proc.kill()  # SIGKILL while DashScope answers: no answer is ever kept
    gw.proc.wait(5)
    sender.join()
    gw.stop()
    gw2 = GatewayProcess(text, tmp_path, "gw2")
    try:
        during = post(gw2.url, payload, "dead-1")
        assert during.status_code == 409 and during.headers["Retry-After"] == "1"
        time.sleep(max(0.0, claimed_at + 8.5 - time.monotonic()))
        after = post(gw2.url, payload, "dead-1")
        assert after.status_code == 410
        assert after.json()["code"] == "IdempotencyAnswerNotKept"
        assert sim_model_calls(sim) == 1  # never run again
    finally:
        gw2.stop()


def _swallow(fn: Any) -> None:
    with contextlib.suppress(requests.RequestException):
        fn()


def test_redis_unreachable_refuses_keyed_requests_before_running(
    sim: Live, redis_server: RedisServer, tmp_path: Path
) -> None:
    state = f"  backend: redis\n  url: {redis_server.url}\n  path: {tmp_path / 's.db'}"
    gw = GatewayProcess(
        team_a_yaml(sim.url, usage_log=tmp_path / "u.jsonl", state=state), tmp_path, "gw"
    )
    try:
        redis_server.stop()
        refused = post(gw.url, body("while redis is down"), "r-1")
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert sim_model_calls(sim) == 0
        plain = requests.post(gw.url + MM, json=body("no key"), headers=HEADERS, timeout=30)
        assert plain.status_code == 200  # requests without the header are served as usual
    finally:
        gw.stop()
