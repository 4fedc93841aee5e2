"""Prices: every image is priced when it is metered, from what DashScope delivered (count and
size), never from what was asked; the cost metric and the usage-log line agree.

Real sockets: the simulator as DashScope, the gateway in front, the official `dashscope` SDK
as the client. The tier tests use qwen-image-3.0-pro, which DashScope prices by output
resolution and which reports its size as `usage.output_width` / `output_height`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dashscope
import pytest
import requests
from dashscope import MultiModalConversation

from proxy.config import ConfigError, parse_config
from proxy.core.pricing import cost_of, highest_price
from proxy.metering import BodySniffer, facts_from_json
from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, Gateway, GatewayFactory
from tests.support import Live

MM = "/api/v1/services/aigc/multimodal-generation/generation"
COST = "dashscope_proxy_cost_total"
PRO = "qwen-image-3.0-pro"
ONE_K, TWO_K = 0.04, 0.075  # the example prices of the product spec, not DashScope's

PRICING = f"""
pricing:
  currency: USD
  models:
    "{PRO}":
      per_image: {TWO_K}
      tiers: [{{max_pixels: 1572864, per_image: {ONE_K}}}]
    "wan2.6-t2i": {{per_image: 0.05, tiers: [{{max_pixels: 1638400, per_image: 0.03}}]}}
    "qwen-image-plus*": {{per_image: 0.03}}
"""


def config(sim: Live, tmp_path: Path, pricing: str = PRICING, server: str = "") -> str:
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {tmp_path / "usage.jsonl"}
{server}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
  - name: team-b
    key: {KEY_B}
state:
  path: {tmp_path / "state.db"}
{pricing}
"""


def ledger(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "usage.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(gw: Gateway, model: str, size: str, n: int = 1, text: str = "a fox") -> Any:
    dashscope.base_http_api_url = gw.api
    rsp = MultiModalConversation.call(
        api_key=KEY_A,
        model=model,
        messages=[{"role": "user", "content": [{"text": text}]}],
        n=n,
        size=size,
    )
    assert rsp.status_code == 200, rsp
    return rsp


@pytest.fixture(autouse=True)
def _restore_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashscope, "base_http_api_url", dashscope.base_http_api_url)


def test_the_delivered_size_picks_the_tier_and_metric_and_log_agree(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    # Present at 0 before any traffic: dashboards and increase() see the first image.
    assert gw.registry.get_sample_value(
        COST, {"key": "team-b", "model": PRO, "currency": "USD"}
    ) == pytest.approx(0.0)

    small = generate(gw, PRO, "1024*1024", n=2)
    assert small.usage["output_width"] == 1024  # what DashScope reports, read by the gateway
    generate(gw, PRO, "2048*2048")
    cost = gw.metric(COST, key="team-a", model=PRO, currency="USD")
    assert cost == pytest.approx(2 * ONE_K + TWO_K)

    lines = ledger(tmp_path)
    assert [(x["images"], x["width"], x["height"], x["cost"], x["currency"]) for x in lines] == [
        (2, 1024, 1024, 0.08, "USD"),
        (1, 2048, 2048, 0.075, "USD"),
    ]
    assert sum(x["cost"] for x in lines) == pytest.approx(cost)
    assert gw.images("team-a", PRO) == sum(x["images"] for x in lines)


def test_wan_size_field_a_snapshot_and_an_unpriced_model(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    # wan2.6-t2i reports its size only as usage.size "W*H".
    generate(gw, "wan2.6-t2i", "1280*1280", n=1)
    generate(gw, "wan2.6-t2i", "1440*1440", n=1)
    # A dated snapshot is priced as its family (and labelled by the name sent).
    generate(gw, PRO + "-2026-09-01", "1024*1024")
    # No price: counted, logged with cost null, and the cost metric does not move.
    generate(gw, "qwen-image-2.0", "1024*1024", n=2)

    lines = ledger(tmp_path)
    got = [(x["model"], x["width"], x["height"], x["cost"], x["currency"]) for x in lines]
    assert got == [
        ("wan2.6-t2i", 1280, 1280, 0.03, "USD"),
        ("wan2.6-t2i", 1440, 1440, 0.05, "USD"),
        (PRO + "-2026-09-01", 1024, 1024, ONE_K, "USD"),
        ("qwen-image-2.0", 1024, 1024, None, None),
    ]
    assert gw.metric(COST, key="team-a", model="wan2.6-t2i", currency="USD") == pytest.approx(0.08)
    assert gw.images("team-a", "qwen-image-2.0") == 2
    unpriced = gw.registry.get_sample_value(
        COST, {"key": "team-a", "model": "qwen-image-2.0", "currency": "USD"}
    )
    assert unpriced is None


def test_a_large_scanned_answer_is_priced_by_its_size(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    # `pad` grows the answer past the 256 KiB parse limit: the gateway scans it instead.
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    rsp = generate(gw, PRO, "1024*1024", n=3, text="a fox [sim:pad=600000]")
    assert len(json.dumps(rsp.output)) > 300_000
    assert gw.metric(COST, key="team-a", model=PRO, currency="USD") == pytest.approx(3 * ONE_K)
    (line,) = ledger(tmp_path)
    assert (line["width"], line["height"], line["cost"]) == (1024, 1024, 0.12)


def test_no_pricing_means_every_image_unpriced(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path, pricing=""))
    r = requests.post(
        gw.url + MM,
        json={
            "model": PRO,
            "input": {"messages": [{"role": "user", "content": [{"text": "a fox"}]}]},
            "parameters": {"size": "2048*2048", "n": 2},
        },
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert gw.images("team-a", PRO) == 2
    (line,) = ledger(tmp_path)
    assert (line["cost"], line["currency"], line["width"]) == (None, None, 2048)
    # Only the series every key has from the start (model `other`), still at 0.
    samples = [s for f in gw.registry.collect() for s in f.samples if s.name == COST]
    assert {(s.labels["key"], s.labels["model"], s.value) for s in samples} == {
        ("team-a", "other", 0.0),
        ("team-b", "other", 0.0),
    }


def test_price_rules_are_pure_and_exact() -> None:
    text = f"""
upstreams: [{{name: a, base_url: "http://127.0.0.1:1/api/v1", api_key: k}}]
keys: [{{name: t, key: abcdefghij}}]
{PRICING}
"""
    pricing = parse_config(text, {}).pricing
    # The first tier whose max_pixels >= width*height; above the last, and unknown: per_image.
    assert cost_of(pricing, PRO, 1, 1536, 1024) == ONE_K  # exactly 1572864 pixels
    assert cost_of(pricing, PRO, 1, 1536, 1025) == TWO_K
    assert cost_of(pricing, PRO, 3, None, None) == 0.225  # not 0.22499999999999998
    assert cost_of(pricing, "qwen-image-plus-2026-01-09", 2, 1328, 1328) == 0.06
    assert cost_of(pricing, "qwen-image-2.0", 1, 1024, 1024) is None
    assert highest_price(pricing, PRO) == TWO_K
    assert highest_price(pricing, "z-image-turbo") is None


def test_the_size_is_read_from_every_answer_shape() -> None:
    shapes = [
        ({"width": 1024, "height": 768, "image_count": 1}, (1024, 768)),
        ({"output_width": 2048, "output_height": 2048, "output_image_count": 1}, (2048, 2048)),
        ({"size": "1280*1280", "image_count": 1}, (1280, 1280)),
        ({"size": "bogus", "image_count": 1}, (None, None)),
        ({"width": True, "height": 5, "image_count": 1}, (None, None)),
    ]
    for usage, size in shapes:
        body = {"output": {"choices": []}, "usage": usage}
        facts = facts_from_json(body)
        assert (facts.width, facts.height) == size, usage
        # The scanner of large bodies finds the same, whatever the chunking.
        raw = json.dumps({"output": {"pad": "x" * 300_000}, "usage": usage}).encode()
        for step in (7, 4096, len(raw)):
            sniffer = BodySniffer()
            for i in range(0, len(raw), step):
                sniffer.feed(raw[i : i + step])
            got = sniffer.facts()
            assert (got.width, got.height) == size, (usage, step)


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("pricing: {currency: ''}", "pricing.currency: must be a short label"),
        ("pricing: {models: {m: {}}}", "pricing.models.m.per_image: is required"),
        ("pricing: {models: {m: {per_image: -1}}}", "pricing.models.m.per_image: must be a number"),
        (
            "pricing: {models: {m: {per_image: .inf}}}",
            "pricing.models.m.per_image: must be a finite number",
        ),
        ("pricing: {models: {m: 3}}", "pricing.models.m: must be a mapping"),
        ("pricing: {models: [m]}", "pricing.models: must be a mapping"),
        ("pricing: {prices: {}}", "pricing.prices: unknown field"),
        (
            "pricing: {models: {m: {per_image: 1, tiers: [{max_pixels: 0, per_image: 1}]}}}",
            "pricing.models.m.tiers[0].max_pixels: must be an integer >= 1",
        ),
        (
            "pricing: {models: {m: {per_image: 1, tiers: [{max_pixels: 9, per_image: 1}, "
            "{max_pixels: 4, per_image: 2}]}}}",
            "pricing.models.m.tiers[1].max_pixels: must be larger than the tier before it (9)",
        ),
        (
            "pricing: {models: {m: {per_image: 1, tiers: [{per_image: 2}]}}}",
            "pricing.models.m.tiers[0].max_pixels: is required",
        ),
    ],
)
def test_every_pricing_problem_is_reported_with_its_location(section: str, problem: str) -> None:
    text = f"""
upstreams: [{{name: a, base_url: "http://127.0.0.1:1/api/v1", api_key: k}}]
keys: [{{name: t, key: abcdefghij, limits: {{spend_per_day: -2}}}}]
{section}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, {})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
    assert "keys[0].limits.spend_per_day: must be a number >= 0, got -2" in err.value.problems


def test_the_shipped_pricing_example_is_valid_and_names_every_model_it_leaves_out() -> None:
    from proxy.metrics import KNOWN_MODELS

    root = Path(__file__).resolve().parent.parent / "config"
    example = (root / "pricing.example.yaml").read_text()
    env = {"DASHSCOPE_API_KEY": "sk-x", "TEAM_A_KEY": "team-a-secret", "DASHSCOPE_API_KEY_CN": "y"}
    config = parse_config((root / "example.yaml").read_text() + "\n" + example, env)
    # No source the gateway was built from states a price: none is shipped as one ...
    assert config.pricing.models == () and config.pricing.currency == "USD"
    # ... and every DashScope image model it knows is listed as left out.
    left_out = example.split("Models left out because no price is known")[1].split("\n\n")[0]
    missing = [m for m in KNOWN_MODELS if f" {m}," not in left_out and f" {m}." not in left_out]
    assert missing == []


def test_a_task_is_priced_by_the_size_its_succeeded_poll_reports(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    import time

    gw = start_gateway(yaml_text=config(sim, tmp_path))
    auth = {"Authorization": f"Bearer {KEY_A}"}
    submit = requests.post(
        gw.url + "/api/v1/services/aigc/image-generation/generation",
        json={
            "model": "wan2.6-t2i",
            "input": {"messages": [{"role": "user", "content": [{"text": "a kite"}]}]},
            "parameters": {"size": "1280*1280", "n": 2},
        },
        headers={**auth, "X-DashScope-Async": "enable"},
        timeout=30,
    )
    assert submit.status_code == 200, submit.text
    task_id = submit.json()["output"]["task_id"]
    deadline = time.monotonic() + 20
    while True:
        poll = requests.get(f"{gw.url}/api/v1/tasks/{task_id}", headers=auth, timeout=10).json()
        if poll["output"]["task_status"] == "SUCCEEDED":
            break
        assert time.monotonic() < deadline, poll
        time.sleep(0.2)
    assert poll["usage"]["size"] == "1280*1280"
    (line,) = ledger(tmp_path)
    assert (line["task_id"], line["images"], line["width"], line["cost"]) == (
        task_id,
        2,
        1280,
        0.06,
    )
    cost = gw.metric(COST, key="team-a", model="wan2.6-t2i", currency="USD")
    assert cost == pytest.approx(0.06)
