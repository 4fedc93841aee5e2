"""`GET /v1/usage`: a key's own images and spend this UTC day and month, per model, with its
limits and what remains, in exactly the product's shape; two keys never see each other's.

Real sockets: the simulator as DashScope, the gateway in front, images generated with the
official `dashscope` SDK and `/v1/usage` read with the official `openai` SDK's raw client.
"""

from __future__ import annotations

import calendar
import re
import time
from pathlib import Path
from typing import Any

import dashscope
import httpx
import jsonschema
import openai
import pytest
import requests
import yaml
from dashscope import MultiModalConversation

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, GatewayFactory
from tests.support import Live
from tests.test_money_pricing import ONE_K, PRICING, PRO, TWO_K

ISO = re.compile(r"^\d{4}-\d\d-\d\dT00:00:00Z$")
PERIOD_FIELDS = {"start", "images", "cost", "by_model", "limits", "remaining"}


def config(sim: Live, tmp_path: Path) -> str:
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {tmp_path / "usage.jsonl"}
upstreams:
  - name: sim
    base_url: {sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
keys:
  - name: team-a
    key: {KEY_A}
    limits: {{images_per_day: 10, images_per_month: 100, spend_per_day: 1.5}}
  - name: team-b
    key: {KEY_B}
state:
  path: {tmp_path / "state.db"}
{PRICING}
"""


def generate(key: str, model: str, size: str, n: int) -> None:
    rsp = MultiModalConversation.call(
        api_key=key,
        model=model,
        messages=[{"role": "user", "content": [{"text": "a heron"}]}],
        n=n,
        size=size,
    )
    assert rsp.status_code == 200, rsp


def documented_schema() -> dict[str, Any]:
    """The 200 answer's schema in proxy/openapi.yaml, with its period schema inlined."""
    doc = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "proxy/openapi.yaml").read_text()
    )
    schema: dict[str, Any] = doc["paths"]["/v1/usage"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    period = doc["components"]["schemas"]["UsagePeriod"]
    schema["properties"]["day"] = schema["properties"]["month"] = period
    return schema


def usage_of(base_url: str, key: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)
    raw = client.get("/usage", cast_to=httpx.Response)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = raw.json()
    jsonschema.validate(body, documented_schema())  # what the OpenAPI document promises
    return body


def test_two_keys_each_see_only_their_own_usage(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    monkeypatch.setattr(dashscope, "base_http_api_url", gw.api)
    generate(KEY_A, PRO, "1024*1024", 2)  # 2 x 0.04
    generate(KEY_A, PRO, "2048*2048", 1)  # 0.075
    generate(KEY_A, "qwen-image-2.0", "1024*1024", 1)  # no price
    generate(KEY_B, "wan2.6-t2i", "1280*1280", 3)  # 3 x 0.03

    a = usage_of(gw.url, KEY_A)
    assert set(a) == {"object", "key", "currency", "day", "month"}
    assert (a["object"], a["key"], a["currency"]) == ("usage", "team-a", "USD")
    spent = 2 * ONE_K + TWO_K
    now = time.gmtime()
    for name, period in (("day", a["day"]), ("month", a["month"])):
        assert set(period) == PERIOD_FIELDS, name
        assert ISO.match(period["start"]), period["start"]
        assert period["images"] == 4
        assert period["cost"] == pytest.approx(spent)
        assert period["by_model"] == {
            PRO: {"images": 3, "cost": pytest.approx(spent)},
            "qwen-image-2.0": {"images": 1, "cost": None},
        }
    assert a["day"]["start"] == time.strftime("%Y-%m-%dT00:00:00Z", now)
    assert a["month"]["start"] == time.strftime("%Y-%m-01T00:00:00Z", now)
    assert a["day"]["limits"] == {"images": 10, "spend": 1.5}
    assert a["day"]["remaining"] == {"images": 6, "spend": pytest.approx(1.5 - spent)}
    assert a["month"]["limits"] == {"images": 100, "spend": None}
    assert a["month"]["remaining"] == {"images": 96, "spend": None}

    b = usage_of(gw.url, KEY_B)
    assert b["key"] == "team-b"
    assert b["day"]["images"] == b["month"]["images"] == 3
    assert b["day"]["by_model"] == {"wan2.6-t2i": {"images": 3, "cost": pytest.approx(0.09)}}
    assert b["day"]["limits"] == {"images": None, "spend": None}
    assert b["day"]["remaining"] == {"images": None, "spend": None}
    # Nothing of team-a's leaks into team-b's answer, and the other way round.
    assert PRO not in b["day"]["by_model"] and "wan2.6-t2i" not in a["day"]["by_model"]


def test_the_period_starts_are_utc_midnight_and_the_first(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    body = usage_of(gw.url, KEY_B)
    day = calendar.timegm(time.strptime(body["day"]["start"], "%Y-%m-%dT%H:%M:%SZ"))
    month = calendar.timegm(time.strptime(body["month"]["start"], "%Y-%m-%dT%H:%M:%SZ"))
    assert 0 <= time.time() - day < 86400 and day % 86400 == 0
    assert month <= day and time.gmtime(month).tm_mday == 1
    # A key that generated nothing: zeros, no models, every limit null.
    assert body["day"]["images"] == 0 and body["day"]["cost"] == 0
    assert body["day"]["by_model"] == {}


def test_usage_needs_a_gateway_key_and_answers_in_the_openai_dialect(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=config(sim, tmp_path))
    r = requests.get(gw.url + "/v1/usage", timeout=5)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    r = requests.get(gw.url + "/v1/usage", headers={"Authorization": "Bearer nope-nope"}, timeout=5)
    assert r.status_code == 401 and "error" in r.json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=UPSTREAM_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.get("/usage", cast_to=httpx.Response)
    r = requests.post(gw.url + "/v1/usage", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=5)
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


def test_the_spend_book_keeps_only_the_current_day_and_month() -> None:
    from proxy.core.pricing import SpendBook, amount

    book = SpendBook()
    nov_30 = calendar.timegm((2026, 11, 30, 23, 59, 0))
    dec_1 = calendar.timegm((2026, 12, 1, 0, 1, 0))
    book.add("team-a", PRO, 2, 0.08, nov_30)
    book.add("team-a", PRO, 1, 0.075, nov_30)
    assert book.period("team-a", "day", nov_30).images == 3
    assert amount(book.period("team-a", "month", nov_30).cost) == pytest.approx(0.155)
    # A new UTC day and month: yesterday's figures are gone, from the answer and from memory.
    book.add("team-a", PRO, 1, None, dec_1)
    day = book.period("team-a", "day", dec_1)
    assert (day.images, day.cost, day.by_model[PRO].unpriced) == (1, 0, 1)
    assert book.period("team-a", "month", dec_1).images == 1
    assert book.period("team-a", "day", nov_30).images == 0
    assert book.period("team-b", "day", dec_1).by_model == {}
