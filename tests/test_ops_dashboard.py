"""The shipped Grafana dashboard: well-formed, covers what operators need, and every metric
it queries exists in a live gateway's /metrics (so no panel is silently empty)."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY
from tests.ops_support import GatewayProcess, Launcher, launching, wait_for
from tests.support import Live

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashscope-proxy.json"
METRIC = re.compile(r"\bdashscope_proxy_[a-z_]+\b")


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    out = [t["expr"] for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            out.append(q["query"])
    return out


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] == "dashscope-proxy" and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels():
        assert p["title"] and p["description"] and p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            for opening, closing in ("()", "[]", "{}"):
                assert expr.count(opening) == expr.count(closing), expr
            assert expr.count('"') % 2 == 0, expr
            # Every query can be narrowed to one Prometheus job.
            assert 'job=~"$job"' in expr, expr


def test_dashboard_covers_the_operator_questions() -> None:
    exprs = " ".join(queries())
    wanted = [
        r"sum by \(key\) \(rate\(dashscope_proxy_images_total",
        r"sum by \(model\) \(rate\(dashscope_proxy_images_total",
        r"sum by \(code\) \(rate\(dashscope_proxy_requests_total",
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\("
        r"dashscope_proxy_request_duration_seconds_bucket",
        r"sum by \(upstream, code\) \(rate\(dashscope_proxy_upstream_errors_total",
        r"dashscope_proxy_inflight_requests",
        r"dashscope_proxy_config_last_reload_successful",
        r"dashscope_proxy_config_reloads_total",
        r"dashscope_proxy_config_last_reload_success_timestamp_seconds",
        r"sum by \(backend, reason\) \(rate\(dashscope_proxy_storage_errors_total",
        r"dashscope_proxy_stored_images_total",
    ]
    for pattern in wanted:
        assert re.search(pattern, exprs), pattern


def test_every_queried_metric_exists_in_a_live_gateway(launcher: Launcher) -> None:
    # Traffic that makes every series appear: images, an upstream error, a failover to
    # a second upstream, a limit rejection, a key with a quota, a reload.
    second = f"""  - name: sim-b
    base_url: {launcher.sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
    priority: 1
"""
    text = (
        launcher.yaml()
        .replace("keys:\n", second + "keys:\n", 1)
        .replace(
            f"    key: {KEY_A}\n",
            f"    key: {KEY_A}\n    limits: {{requests_per_minute: 1, images_per_day: 100}}\n",
        )
    )
    # Storage on, so its series exist (the image row).
    text += (
        f"storage:\n  path: {launcher.tmp / 'images'}\n"
        "  signing_key: dashboard-test-signing-key-01\n"
    )
    launcher.config_path.write_text(text)
    gw = GatewayProcess(launcher.config_path)
    launcher.running.append(gw)
    assert gw.generate(KEY_A, n=2).status_code == 200
    assert gw.generate(KEY_A).status_code == 429  # requests_per_minute
    assert gw.generate(KEY_B, "[sim:error=503]").status_code == 503  # tried sim, then sim-b
    assert gw.generate(KEY_B, "[sim:error=429]").status_code == 429
    requests.get(gw.url + "/readyz", timeout=5)
    gw.signal(signal.SIGHUP)
    wait_for(
        lambda: gw.metric("dashscope_proxy_config_reloads_total", result="success") == 1,
        10,
        "the reload",
    )
    text = requests.get(gw.url + "/metrics", timeout=5).text
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    queried = {m for q in queries() for m in METRIC.findall(q)}
    assert len(queried) >= 8
    missing = sorted(queried - exposed)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"
