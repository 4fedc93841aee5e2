"""Every image DashScope bills is counted: the 2026 models and their usage shape, answers that
report no count, tasks nobody polls (the reconciler, across a restart), the labels of images
counted while listing tasks, models that are not DashScope's, and every throttle a 429.

Real sockets throughout: the simulator as DashScope, the gateway in front of it, the official
`dashscope` and `openai` SDKs as clients.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dashscope
import openai
import pytest
import requests
from dashscope import MultiModalConversation

from proxy.upstream.probe import PROBE_TASK_ID
from tests.conftest import KEY_A, UPSTREAM_KEY, Gateway, GatewayFactory
from tests.redis_support import RedisServer
from tests.resilience_support import (
    IG,
    MM,
    A,
    GatewayProcess,
    body,
    sim_model_calls,
    sim_requests,
    team_a_yaml,
)
from tests.support import Live

ASYNC = {"X-DashScope-Async": "enable"}
ALIYUN = "/aliyun/v1/images/generations"


def config(sim: Live, tmp_path: Path, *, tasks: str = "", upstream_models: str = '["*"]') -> str:
    return team_a_yaml(
        sim.url,
        usage_log=tmp_path / "usage.jsonl",
        state=f"  path: {tmp_path / 'state.db'}",
        upstream_models=upstream_models,
        extra=f"tasks:\n  {tasks or 'reconcile: false'}",
    )


def usage_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return usage_lines_at(tmp_path, "usage.jsonl")


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sim_stats(sim: Live) -> dict[str, Any]:
    stats: dict[str, Any] = requests.get(sim.url + "/_sim/stats", timeout=5).json()
    return stats


def sim_polls(sim: Live) -> int:
    """Task polls that reached DashScope, the gateway's key probes not included."""
    by_path = sim_stats(sim)["requests_by_path"]
    probes = sum(PROBE_TASK_ID in str(r.get("path")) for r in sim_requests(sim))
    return int(by_path.get("/api/v1/tasks/{task_id}", 0)) - probes


def post(gw: Gateway, payload: dict[str, Any], path: str = MM, **headers: str) -> requests.Response:
    return requests.post(gw.url + path, json=payload, headers={**A, **headers}, timeout=15)


# --------------------------------------------------------------- the 2026 usage shape


def test_qwen_image_3_is_counted_from_output_image_count(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    monkeypatch.setattr(dashscope, "base_http_api_url", gw.api)
    rsp = MultiModalConversation.call(
        api_key=KEY_A,
        model="qwen-image-3.0-pro",
        messages=[{"role": "user", "content": [{"text": "a red fox"}]}],
        n=3,
        size="1024*1024",
    )
    assert rsp.status_code == 200, rsp
    assert "image_count" not in rsp.usage and rsp.usage["output_image_count"] == 3
    assert gw.images("team-a", "qwen-image-3.0-pro") == 3
    # A dated snapshot behaves as its family and is labelled by the name sent.
    r = post(gw, body(model="qwen-image-3.0-pro-2026-09-01", n=2))
    assert r.status_code == 200, r.text
    assert gw.images("team-a", "qwen-image-3.0-pro-2026-09-01") == 2
    assert gw.metric("dashscope_proxy_metering_anomalies_total", reason="no_count_field") == 0
    lines = usage_lines(tmp_path)
    assert [(ln["model"], ln["images"]) for ln in lines] == [
        ("qwen-image-3.0-pro", 3),
        ("qwen-image-3.0-pro-2026-09-01", 2),
    ]


def test_text_only_items_are_not_images(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    r = post(gw, body("a cat [sim:textitem]", model="qwen-image-3.0", n=3))
    assert r.status_code == 200, r.text
    content = [c["message"]["content"][0] for c in r.json()["output"]["choices"]]
    assert sum("image" in item for item in content) == 2  # one choice holds only text
    assert gw.images("team-a", "qwen-image-3.0") == 2


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_without_a_count_is_counted_by_its_images(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, stream: bool
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    extra = {"X-DashScope-SSE": "enable"} if stream else {}
    r = post(gw, body("a cat [sim:nocount]", model="qwen-image-3.0", n=2), **extra)
    assert r.status_code == 200, r.text
    assert "output_image_count" not in r.text and '"image_count"' not in r.text
    assert gw.images("team-a", "qwen-image-3.0") == 2
    assert gw.metric("dashscope_proxy_metering_anomalies_total", reason="no_count_field") == 1
    # A normal answer is no anomaly.
    assert post(gw, body(model="qwen-image-3.0")).status_code == 200
    assert gw.metric("dashscope_proxy_metering_anomalies_total", reason="no_count_field") == 1
    assert gw.images("team-a", "qwen-image-3.0") == 3


def test_inline_base64_images_without_a_count(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    # pad: a body larger than the parse limit, so the streaming scanner counts.
    r = post(
        gw, body("a cat [sim:base64] [sim:nocount] [sim:pad=600000]", model="qwen-image-3.0", n=2)
    )
    assert r.status_code == 200, r.text
    items = [c["message"]["content"][0]["image"] for c in r.json()["output"]["choices"]]
    assert all(i.startswith("data:image/png;base64,") for i in items)
    assert gw.images("team-a", "qwen-image-3.0") == 2
    assert gw.metric("dashscope_proxy_metering_anomalies_total", reason="no_count_field") == 1


def test_an_async_task_without_a_count_is_counted_by_its_results(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    payload = {"model": "wanx2.1-t2i-turbo", "input": {"prompt": "a cat [sim:nocount]"}}
    payload["parameters"] = {"n": 2}
    r = post(gw, payload, "/api/v1/services/aigc/text2image/image-synthesis", **ASYNC)
    task_id = r.json()["output"]["task_id"]
    wait_until(
        lambda: (
            requests.get(f"{gw.api}/tasks/{task_id}", headers=A, timeout=5).json()["output"][
                "task_status"
            ]
            == "SUCCEEDED"
        ),
        "the task to succeed",
    )
    assert gw.images("team-a", "wanx2.1-t2i-turbo") == 2
    assert gw.metric("dashscope_proxy_metering_anomalies_total", reason="no_count_field") == 1


# ------------------------------------------------------------------ the reconciler


def test_a_task_nobody_polls_is_counted_once(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path, tasks="{reconcile_after_seconds: 0.3}"))
    r = post(gw, body(model="wan2.6-t2i", n=2), IG, **ASYNC)
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    # Nobody polls: the gateway does, and counts the task's images under its model.
    wait_until(lambda: gw.images("team-a", "wan2.6-t2i") == 2, "the reconciler to count it")
    assert (
        gw.metric("dashscope_proxy_reconciler_polls_total", upstream="sim", outcome="succeeded")
        == 1
    )
    lines = usage_lines(tmp_path)
    assert [(ln["route"], ln["task_id"], ln["images"]) for ln in lines] == [
        ("reconciler", task_id, 2)
    ]
    polls = sim_polls(sim)
    # Final: never polled again, and a client poll now counts nothing more.
    time.sleep(1.0)
    assert sim_polls(sim) == polls
    r = requests.get(f"{gw.api}/tasks/{task_id}", headers=A, timeout=5)
    assert r.json()["output"]["task_status"] == "SUCCEEDED"
    assert gw.images("team-a", "wan2.6-t2i") == 2
    assert len(usage_lines(tmp_path)) == 1
    # These polls are the gateway's own: the key's request metrics show none of them.
    assert (
        gw.metric(
            "dashscope_proxy_requests_total",
            route="tasks.get",
            key="team-a",
            model="wan2.6-t2i",
            code="200",
        )
        == 1
    )


def test_a_client_poll_and_the_reconciler_count_once_together(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path, tasks="{reconcile_after_seconds: 0.01}"))
    ids = []
    for _ in range(8):
        r = post(gw, body(model="wan2.6-t2i", n=1), IG, **ASYNC)
        ids.append(r.json()["output"]["task_id"])

    def all_done() -> bool:
        done = 0
        for task_id in ids:  # the client polls too, racing the reconciler
            r = requests.get(f"{gw.api}/tasks/{task_id}", headers=A, timeout=5)
            done += r.json()["output"]["task_status"] == "SUCCEEDED"
        return done == len(ids)

    wait_until(all_done, "every task to succeed")
    wait_until(lambda: gw.images("team-a", "wan2.6-t2i") == 8, "8 images")
    time.sleep(0.5)
    assert gw.images("team-a", "wan2.6-t2i") == 8
    assert sorted(ln["task_id"] for ln in usage_lines(tmp_path)) == sorted(ids)


def test_a_restart_between_submit_and_reconcile_loses_nothing(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    text = config(sim, tmp_path, tasks="{reconcile_after_seconds: 2}")
    gw = start_gateway(yaml_text=text)
    r = post(gw, body(model="wan2.6-t2i", n=2), IG, **ASYNC)
    task_id = r.json()["output"]["task_id"]
    start_gateway.stop(gw)  # before its first background poll
    assert gw.images("team-a", "wan2.6-t2i") == 0
    gw = start_gateway(yaml_text=text)
    # The schedule is in the state file: the new process polls it when it is due.
    wait_until(lambda: gw.images("team-a", "wan2.6-t2i") == 2, "the reconciler after a restart")
    assert [(ln["route"], ln["task_id"]) for ln in usage_lines(tmp_path)] == [
        ("reconciler", task_id)
    ]


def test_reconciler_polls_are_paced(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    off = "{reconcile: false, reconcile_after_seconds: 0.1}"
    gw = start_gateway(yaml_text=config(sim, tmp_path, tasks=off))
    for _ in range(12):
        assert post(gw, body(model="wan2.6-t2i", n=1), IG, **ASYNC).status_code == 200
    start_gateway.stop(gw)
    time.sleep(1.0)
    before = sim_polls(sim)
    gw = start_gateway(
        yaml_text=config(
            sim,
            tmp_path,
            tasks="{reconcile_after_seconds: 0.1, reconcile_polls_per_second: 5}",
        )
    )
    started = time.monotonic()
    wait_until(lambda: gw.images("team-a", "wan2.6-t2i") == 12, "12 images", timeout=20)
    elapsed = time.monotonic() - started
    # 12 polls at 5 per second take at least 2.2 s (the first starts at once).
    assert elapsed >= 2.0, elapsed
    assert sim_polls(sim) - before == 12


# ---------------------------------------------------------------------- labels


def test_images_counted_while_listing_carry_the_tasks_model(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    r = post(gw, body(model="wan2.6-t2i", n=2), IG, **ASYNC)
    assert r.status_code == 200
    time.sleep(1.0)  # succeeded upstream; nobody polled

    def listed_succeeded() -> bool:
        r = requests.get(f"{gw.api}/tasks", headers=A, timeout=5)
        return bool(r.json()["data"][0]["status"] == "SUCCEEDED")

    wait_until(listed_succeeded, "the list to refresh the task")
    assert gw.images("team-a", "wan2.6-t2i") == 2
    assert gw.images("team-a", "other") == 0


# ------------------------------------------------------- models that are not DashScope's


def test_aliyun_refuses_non_dashscope_models_with_the_platform_envelope(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    before = sim_model_calls(sim)
    for model in ("gpt-image-1", "dall-e-3", "flux-pro"):
        r = requests.post(gw.url + ALIYUN, json=body(model=model), headers=A, timeout=10)
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "message": "only aliyun channel is supported on /aliyun/v1/images/generations",
                "type": "invalid_request_error",
                "code": "invalid_request",
            }
        }
    assert sim_model_calls(sim) == before
    # A DashScope model still works there, a dated snapshot included.
    r = requests.post(
        gw.url + ALIYUN, json=body(model="qwen-image-2.0-pro-2026-04-22"), headers=A, timeout=10
    )
    assert r.status_code == 200, r.text
    assert gw.images("team-a", "qwen-image-2.0-pro-2026-04-22") == 1


def test_openai_front_refuses_non_dashscope_models(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    before = sim_model_calls(sim)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="gpt-image-1", prompt="a cat", response_format="url")
    assert err.value.status_code == 400
    assert err.value.code == "model_not_found"
    assert "'gpt-image-1'" in str(err.value.message)
    assert sim_model_calls(sim) == before
    img = client.images.generate(model="z-image-turbo", prompt="a cat", response_format="url")
    assert img.data and img.data[0].url
    assert gw.images("team-a", "z-image-turbo") == 1


def test_names_the_config_or_an_explicit_pattern_declares_are_accepted(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    text = config(sim, tmp_path, upstream_models='["*", "studio-*"]')
    text += "models:\n  gpt-image-1: {target: qwen-image-2.0}\n"
    gw = start_gateway(yaml_text=text)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    img = client.images.generate(model="gpt-image-1", prompt="a cat", response_format="url")
    assert img.data and img.data[0].url
    assert gw.images("team-a", "gpt-image-1") == 1
    # studio-model is declared by the upstream's pattern: it reaches DashScope, which
    # answers for itself (the simulator does not know it).
    before = sim_model_calls(sim)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="studio-model", prompt="a cat", response_format="url")
    assert "Model not exist" in str(err.value.message)
    assert sim_model_calls(sim) == before + 1


# ------------------------------------------------------------------------ throttling


@pytest.mark.parametrize("kind", ["burst", "throttling", "429", "quota"])
def test_every_throttle_is_a_429_with_retry_after(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, kind: str
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    r = post(gw, body(f"a cat [sim:error={kind}]"))
    assert r.status_code == 429, r.text
    assert r.json()["code"].startswith("Throttling")
    assert int(r.headers["Retry-After"]) >= 1
    # Streaming request: still a 429 with Retry-After before the stream starts.
    r = post(gw, body(f"a cat [sim:error={kind}]"), **{"X-DashScope-SSE": "enable"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    # The OpenAI SDK raises its rate-limit error and sees Retry-After.
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.images.generate(model="qwen-image-2.0", prompt=f"a cat [sim:error={kind}]")
    assert int(err.value.response.headers["Retry-After"]) >= 1
    # /aliyun/v1 relays DashScope's own body, as a 429 with Retry-After.
    r = requests.post(
        gw.url + ALIYUN, json=body(f"a cat [sim:error={kind}]"), headers=A, timeout=10
    )
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert gw.images("team-a", "qwen-image-2.0") == 0


# ------------------------------------------------------------- replicas sharing Redis


def test_two_replicas_and_a_client_poll_count_each_task_once(
    sim: Live, redis_server: RedisServer, tmp_path: Path
) -> None:
    def replica(i: int) -> GatewayProcess:
        text = f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {tmp_path / f"usage{i}.jsonl"}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
state:
  backend: redis
  url: {redis_server.url}
  path: {tmp_path / f"spool{i}.db"}
tasks:
  reconcile_after_seconds: 0.05
  reconcile_max_interval_seconds: 0.2
"""
        return GatewayProcess(text, tmp_path, f"gw{i}")

    gws = (replica(1), replica(2))
    try:
        generated_before = sim_stats(sim)["images_generated"]
        ids = []
        for i in range(20):
            gw = gws[i % 2]
            r = requests.post(
                gw.url + IG, json=body(model="wan2.6-t2i", n=1), headers={**A, **ASYNC}, timeout=10
            )
            assert r.status_code == 200, r.text
            ids.append(r.json()["output"]["task_id"])

        def client_polls_done() -> bool:  # a client polls on replica 1, racing both reconcilers
            statuses = [
                requests.get(f"{gws[0].url}/api/v1/tasks/{t}", headers=A, timeout=5).json()[
                    "output"
                ]["task_status"]
                for t in ids
            ]
            return all(s == "SUCCEEDED" for s in statuses)

        wait_until(client_polls_done, "every task to succeed", timeout=30)

        def total() -> float:
            return sum(
                gw.metric("dashscope_proxy_images_total", key="team-a", model="wan2.6-t2i")
                for gw in gws
            )

        wait_until(lambda: total() == 20, "20 images across the replicas")
        time.sleep(1.0)  # nothing more arrives late
        assert total() == 20
        lines = usage_lines_at(tmp_path, "usage1.jsonl") + usage_lines_at(tmp_path, "usage2.jsonl")
        assert sorted(ln["task_id"] for ln in lines) == sorted(ids)
        assert sim_stats(sim)["images_generated"] - generated_before == 20
    finally:
        for gw in gws:
            gw.stop()


def usage_lines_at(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
