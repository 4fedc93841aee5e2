"""Spend limits over real sockets: the highest price reserved at admission, settled to the
delivered size's price, concurrent requests unable to overspend, task reservations, unpriced
models never blocked, both dialects, and two gateway processes sharing one Redis."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from proxy.state.limiter import seconds_to_next_day
from tests.conftest import KEY_A, GatewayFactory
from tests.redis_support import RedisServer
from tests.resilience_support import MM, A, GatewayProcess, body, team_a_yaml
from tests.support import Live

T2I = "/api/v1/services/aigc/text2image/image-synthesis"
PRICING = """
pricing:
  currency: USD
  models:
    "qwen-image-3.0-pro": {per_image: 0.075, tiers: [{max_pixels: 1572864, per_image: 0.04}]}
    "qwen-image-2.0": {per_image: 0.1}
    "qwen-image-plus": {per_image: 0.1}
"""


def config(sim: Live, tmp_path: Path, limits: str, state: str = "") -> str:
    return team_a_yaml(
        sim.url,
        usage_log=tmp_path / "usage.jsonl",
        state=f"  path: {tmp_path / 'state.db'}\n{state}",
        limits=limits,
        extra=PRICING,
    )


def post(url: str, payload: dict[str, Any], path: str = MM, **headers: str) -> requests.Response:
    return requests.post(url + path, json=payload, headers={**A, **headers}, timeout=20)


def assert_spend_refusal(r: requests.Response, limit: str = "spend_per_day") -> None:
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "Throttling.AllocationQuota"
    assert limit in r.json()["message"]
    retry = int(r.headers["Retry-After"])
    expected = seconds_to_next_day(time.time()) if limit == "spend_per_day" else None
    if expected is not None:
        assert abs(retry - expected) <= 5, (retry, expected)  # to the end of the UTC day


def test_concurrent_requests_cannot_overspend(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path, "spend_per_day: 0.25"))
    results: list[requests.Response] = []

    def one() -> None:  # each may cost 0.10; held by DashScope for a second
        results.append(post(gw.url, body("a cat [sim:slow=1]", model="qwen-image-2.0")))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429, 429], codes
    for r in results:
        if r.status_code == 429:
            assert_spend_refusal(r)
    # 0.20 spent: another 0.10 would exceed 0.25.
    assert_spend_refusal(post(gw.url, body(model="qwen-image-2.0")))
    assert gw.images("team-a", "qwen-image-2.0") == 2
    assert (
        gw.metric("dashscope_proxy_limit_rejections_total", key="team-a", limit="spend_per_day")
        == 4
    )


def test_the_reservation_settles_to_the_delivered_sizes_price(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    # Reserved at the 2K price (0.075), charged at the 1K tier (0.04) actually delivered.
    gw = start_gateway(yaml_text=config(sim, tmp_path, "spend_per_day: 0.12"))
    one_k = body(model="qwen-image-3.0-pro", size="1024*1024")
    assert post(gw.url, one_k).status_code == 200  # spent 0.04
    assert post(gw.url, one_k).status_code == 200  # 0.04 + 0.075 <= 0.12; spent 0.08
    assert_spend_refusal(post(gw.url, one_k))  # 0.08 + 0.075 > 0.12
    cost = gw.metric(
        "dashscope_proxy_cost_total", key="team-a", model="qwen-image-3.0-pro", currency="USD"
    )
    assert cost == pytest.approx(0.08)


def test_unpriced_models_are_never_blocked_and_openai_dialect(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path, "spend_per_day: 0.05, spend_per_month: 1"))
    assert_spend_refusal(post(gw.url, body(model="qwen-image-2.0")))  # 0.10 > 0.05
    assert post(gw.url, body(model="qwen-image-max")).status_code == 200  # no price
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.images.generate(model="qwen-image-2.0", prompt="a cat", response_format="url")
    assert err.value.code == "spend_limit_exceeded"
    assert "spend_per_day" in str(err.value.message)


def test_a_task_holds_its_reservation_until_it_ends(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path, "spend_per_day: 0.15"))
    failing = {"model": "qwen-image-plus", "input": {"prompt": "a cat [sim:fail]"}}
    r = post(gw.url, failing, T2I, **{"X-DashScope-Async": "enable"})
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    # While it runs, its 0.10 stays reserved: a second one does not fit in 0.15.
    other = {"model": "qwen-image-plus", "input": {"prompt": "a dog"}}
    assert_spend_refusal(post(gw.url, other, T2I, **{"X-DashScope-Async": "enable"}))
    deadline = time.monotonic() + 10
    while True:  # it fails: nothing was spent, its reservation is freed
        status = requests.get(f"{gw.api}/tasks/{task_id}", headers=A, timeout=5).json()
        if status["output"]["task_status"] == "FAILED":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = post(gw.url, other, T2I, **{"X-DashScope-Async": "enable"})
    assert r.status_code == 200, r.text


def test_two_replicas_share_the_spend_limit(
    sim: Live, tmp_path: Path, redis_server: RedisServer
) -> None:
    state = f"  backend: redis\n  url: {redis_server.url}\n"
    gws = [
        GatewayProcess(
            config(sim, tmp_path, "spend_per_day: 0.25", state).replace(
                f"  path: {tmp_path / 'state.db'}", f"  path: {tmp_path / f'spool{i}.db'}"
            ),
            tmp_path,
            f"gw{i}",
        )
        for i in (1, 2)
    ]
    try:
        assert post(gws[0].url, body(model="qwen-image-2.0")).status_code == 200
        assert post(gws[1].url, body(model="qwen-image-2.0")).status_code == 200
        assert_spend_refusal(post(gws[0].url, body(model="qwen-image-2.0")))
        assert_spend_refusal(post(gws[1].url, body(model="qwen-image-2.0")))
        # GET /v1/usage on either replica reports the shared spend and what remains.
        for gw in gws:
            day = requests.get(gw.url + "/v1/usage", headers=A, timeout=5).json()["day"]
            assert day["cost"] == pytest.approx(0.2)
            assert day["limits"]["spend"] == 0.25
            assert day["remaining"]["spend"] == pytest.approx(0.05)
    finally:
        for gw in gws:
            gw.stop()


def test_with_redis_a_failed_request_frees_its_spend_and_image_reservations(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A key under an image quota and a spend limit on Redis: a request DashScope refuses
    (nothing generated) frees both its reservations when it ends, so the next request
    that needs the whole remaining room is admitted at once, not after the lease lapses."""
    state = f"  backend: redis\n  url: {redis_server.url}\n"
    gw = start_gateway(
        yaml_text=config(sim, tmp_path, "images_per_day: 2, spend_per_day: 0.1", state)
    )
    for _ in range(3):
        r = post(gw.url, body("a cat [sim:fail]", model="qwen-image-2.0"))
        assert r.status_code == 400, r.text
    assert post(gw.url, body(model="qwen-image-2.0")).status_code == 200  # spent 0.10
    assert_spend_refusal(post(gw.url, body(model="qwen-image-2.0")))
    assert gw.images("team-a", "qwen-image-2.0") == 1
