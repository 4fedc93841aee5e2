"""Failures that name their cause: a wrong DashScope key, a restored config, a missing key, the
wrong base URL, methods a path does not take. Real sockets, real processes, both SDKs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dashscope
import openai
import pytest
import requests
from dashscope import MultiModalConversation

from proxy.errors import suggested_base
from tests.conftest import KEY_A, UPSTREAM_KEY, GatewayFactory
from tests.ops_support import Launcher, launching, wait_for, write_atomically
from tests.resilience_support import MM, A, body, sim_model_calls
from tests.support import Live

LAST_OK = "dashscope_proxy_config_last_reload_successful"


def two_upstreams(sim: Live, tmp_path: Path, first_key: str, second_key: str) -> str:
    return f"""
server:
  host: 127.0.0.1
  port: 0
  usage_log: {tmp_path / "usage.jsonl"}
upstreams:
  - name: first
    base_url: {sim.url}/api/v1
    api_key: {first_key}
    priority: 0
  - name: second
    base_url: {sim.url}/api/v1
    api_key: {second_key}
    priority: 1
keys:
  - name: team-a
    key: {KEY_A}
state:
  path: {tmp_path / "state.db"}
"""


def wait_ready_status(url: str, status: int, timeout: float = 10.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = requests.get(url + "/readyz", timeout=5)
        if r.status_code == status:
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


# ------------------------------------------------------------- a wrong DashScope key


def test_a_wrong_upstream_key_is_the_operators_problem(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = start_gateway(yaml_text=two_upstreams(sim, tmp_path, "sk-wrong-1", "sk-wrong-2"))
    # The startup probe already knows: not ready, both upstreams named, both down.
    r = wait_ready_status(gw.url, 503)
    problems = r.json()["problems"]
    assert "no upstream has a working DashScope key" in problems
    assert any("first" in p and "rejected its API key" in p for p in problems)
    assert any("second" in p for p in problems)
    assert gw.metric("dashscope_proxy_upstream_up", upstream="first") == 0
    # A team's request: both upstreams tried, then 502 naming them, never InvalidApiKey.
    r = requests.post(gw.url + MM, json=body(), headers=A, timeout=10)
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "UpstreamAuthenticationFailed"
    assert "'first'" in r.json()["message"] and "'second'" in r.json()["message"]
    assert UPSTREAM_KEY not in r.text and "sk-wrong" not in r.text
    # The DashScope SDK shows the cause as is.
    monkeypatch.setattr(dashscope, "base_http_api_url", gw.api)
    rsp = MultiModalConversation.call(
        api_key=KEY_A,
        model="qwen-image-2.0",
        messages=[{"role": "user", "content": [{"text": "a cat"}]}],
    )
    assert rsp.status_code == 502 and rsp.code == "UpstreamAuthenticationFailed"
    # The OpenAI SDK: a server error with its own code.
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.images.generate(model="qwen-image-2.0", prompt="a cat", response_format="url")
    assert err.value.code == "upstream_authentication_failed"
    assert gw.images("team-a", "qwen-image-2.0") == 0


def test_the_next_upstream_serves_when_one_key_is_wrong(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway(yaml_text=two_upstreams(sim, tmp_path, "sk-wrong-1", UPSTREAM_KEY))
    r = wait_ready_status(gw.url, 200)
    deadline = time.monotonic() + 10
    while not r.json()["problems"]:  # the probe runs beside startup
        assert time.monotonic() < deadline
        time.sleep(0.05)
        r = requests.get(gw.url + "/readyz", timeout=5)
    assert r.json()["problems"] == ["upstream first: DashScope rejected its API key"]
    r = requests.post(gw.url + MM, json=body(), headers=A, timeout=10)
    assert r.status_code == 200, r.text
    assert gw.images("team-a", "qwen-image-2.0") == 1
    assert gw.metric("dashscope_proxy_upstream_up", upstream="first") == 0
    assert gw.metric("dashscope_proxy_upstream_up", upstream="second") == 1


def check_config(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", *args, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_probe_names_each_failing_upstream(sim: Live, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(two_upstreams(sim, tmp_path, "sk-wrong-1", UPSTREAM_KEY))
    before = sim_model_calls(sim)
    plain = check_config(path)
    assert plain.returncode == 0, plain.stderr  # without --probe: the file alone
    probed = check_config(path, "--probe")
    assert probed.returncode == 1
    assert "upstream first: FAILED: DashScope rejected the API key" in probed.stdout
    assert "upstream second: OK" in probed.stdout
    assert "first" in probed.stderr and "second" not in probed.stderr
    assert "sk-wrong-1" not in probed.stdout + probed.stderr
    assert sim_model_calls(sim) == before  # the probe generates nothing
    path.write_text(two_upstreams(sim, tmp_path, UPSTREAM_KEY, UPSTREAM_KEY))
    assert check_config(path, "--probe").returncode == 0


# -------------------------------------------------------- the failed-reload signal


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def test_restoring_a_config_clears_the_failed_reload_signal(launcher: Launcher) -> None:
    gw = launcher.start("", "--config-poll-seconds", "0.25")
    good = launcher.config_path.read_text()
    assert gw.metric(LAST_OK) == 1
    write_atomically(launcher.config_path, good.replace("keys:", "keys: [", 1))
    wait_for(lambda: gw.metric(LAST_OK) == 0, 10, "the rejected reload")
    write_atomically(launcher.config_path, good)  # restored byte for byte
    wait_for(lambda: gw.metric(LAST_OK) == 1, 10, "the signal to clear")
    assert "the earlier rejected reload is resolved" in gw.stderr_text()


# ------------------------------------------------------------------ no key at all


def test_a_missing_key_says_so_in_both_dialects(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    gw = start_gateway()
    r = requests.post(gw.url + MM, json=body(), timeout=5)
    assert r.status_code == 401
    assert (r.json()["code"], r.json()["message"]) == ("NoApiKey", "No API-key provided.")
    r = requests.post(gw.url + MM, json=body(), headers={"Authorization": "Bearer "}, timeout=5)
    assert r.json()["code"] == "NoApiKey"
    r = requests.post(gw.url + "/v1/images/generations", json={"prompt": "a cat"}, timeout=5)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"
    # A wrong key is still InvalidApiKey.
    r = requests.post(
        gw.url + MM, json=body(), headers={"Authorization": "Bearer nope-nope"}, timeout=5
    )
    assert r.json()["code"] == "InvalidApiKey"


# ------------------------------------------------------------------ the wrong base URL


@pytest.mark.parametrize(
    ("path", "base"),
    [
        ("/v1/services/aigc/multimodal-generation/generation", "/api/v1"),
        ("/services/aigc/text2image/image-synthesis", "/api/v1"),
        ("/api/v1/api/v1/tasks/abc", "/api/v1"),
        ("/api/v1/images/generations", "/v1"),
        ("/v1/v1/images/generations", "/v1"),
        ("/images/edits", "/v1"),
        ("/api/v1/services/aigc/multimodal-generation/generation", None),
        ("/v1/images/generations", None),
        ("/favicon.ico", None),
    ],
)
def test_suggested_base(path: str, base: str | None) -> None:
    assert suggested_base(path) == base


# ------------------------------------------------------------------ the OpenAPI document


def test_the_document_and_the_server_agree(
    start_gateway: GatewayFactory, sim: Live, tmp_path: Path
) -> None:
    from proxy.fronts.ops import load_document

    doc = load_document()
    assert doc["servers"][0]["url"] == "/"  # wherever the gateway runs
    # An empty start_time does not match the documented pattern: the server refuses it.
    gw = start_gateway()
    r = requests.get(gw.api + "/tasks", params={"start_time": ""}, headers=A, timeout=5)
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter", r.text
    r = requests.get(gw.api + "/tasks", params={"start_time": "2026"}, headers=A, timeout=5)
    assert r.status_code == 400
    assert requests.get(gw.api + "/tasks", headers=A, timeout=5).status_code == 200
    # /aliyun/v1 passes DashScope's own errors through: the document allows both shapes.
    r = requests.post(
        gw.url + "/aliyun/v1/images/generations",
        json=body("a cat [sim:error=inspection]"),
        headers=A,
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["code"] == "DataInspectionFailed"
    op = doc["paths"]["/aliyun/v1/images/generations"]["post"]["responses"]["400"]
    shapes = doc["components"]["responses"][op["$ref"].rsplit("/", 1)[1]]
    one_of = shapes["content"]["application/json"]["schema"]["oneOf"]
    assert {"$ref": "#/components/schemas/DashScopeError"} in one_of
    # Empty model / prompt are refused, as the document's minLength says.
    for payload in ({"model": "", "prompt": "a cat"}, {"prompt": ""}):
        r = requests.post(gw.url + "/v1/images/generations", json=payload, headers=A, timeout=5)
        assert r.status_code == 400, (payload, r.text)
    schema = doc["components"]["schemas"]["OpenAIImageRequest"]["properties"]
    assert schema["prompt"]["minLength"] == 1 and schema["model"]["minLength"] == 1


# ----------------------------------------------------- wrong base URLs, methods, OPTIONS


def test_the_dashscope_sdk_pointed_at_v1_learns_the_right_base(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = start_gateway()
    monkeypatch.setattr(dashscope, "base_http_api_url", gw.url + "/v1")  # the common mistake
    rsp = MultiModalConversation.call(
        api_key=KEY_A,
        model="qwen-image-2.0",
        messages=[{"role": "user", "content": [{"text": "a cat"}]}],
    )
    assert rsp.status_code == 404
    assert rsp.code == "NotFound"  # the SDK reads it (it showed code=None, message='')
    assert "/api/v1" in rsp.message and "base_http_api_url" in rsp.message


def test_the_openai_sdk_pointed_at_api_v1_learns_the_right_base(
    start_gateway: GatewayFactory,
) -> None:
    gw = start_gateway()
    client = openai.OpenAI(base_url=gw.url + "/api/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="qwen-image-2.0", prompt="a cat")
    assert "base_url is http(s)://<gateway>/v1" in str(err.value.message)
    # Both shapes in one body, whichever SDK reads it.
    r = requests.get(gw.url + "/nope", timeout=5)
    assert r.status_code == 404
    assert r.json()["code"] == "NotFound" and r.json()["error"]["code"] == "not_found"
    assert r.json()["message"] == "No such endpoint."  # no hint for a path that means nothing


def test_405_names_the_methods_and_options_answers(start_gateway: GatewayFactory) -> None:
    gw = start_gateway()
    r = requests.get(gw.url + MM, headers=A, timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.delete(gw.url + "/v1/images/generations", headers=A, timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = requests.options(gw.url + MM, timeout=5)
    assert r.status_code == 204 and r.headers["Allow"] == "OPTIONS, POST"
    r = requests.options(gw.api + "/tasks/abc", timeout=5)
    assert r.status_code == 204 and "GET" in r.headers["Allow"]


def test_what_no_route_takes_is_counted_and_logged_as_unmatched(
    start_gateway: GatewayFactory,
) -> None:
    gw = start_gateway()
    assert requests.get(gw.url + "/nope", headers=A, timeout=5).status_code == 404
    head = requests.head(gw.url + "/nope/deeper", timeout=5)
    assert head.status_code == 404 and head.content == b""
    assert requests.get(gw.url + MM, headers=A, timeout=5).status_code == 405
    labels = {"route": "unmatched", "key": "anonymous", "model": "other"}
    assert gw.metric("dashscope_proxy_requests_total", **labels, code="404") == 2
    assert gw.metric("dashscope_proxy_requests_total", **labels, code="405") == 1
    lines = [(line["route"], line["method"], line["status"]) for line in gw.log_lines()]
    assert lines == [
        ("unmatched", "GET", 404),
        ("unmatched", "HEAD", 404),
        ("unmatched", "GET", 405),
    ], lines


def test_metrics_carry_process_figures_and_the_version(start_gateway: GatewayFactory) -> None:
    from proxy import __version__

    gw = start_gateway()
    text = requests.get(gw.url + "/metrics", timeout=5).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["process_resident_memory_bytes"] > 10_000_000
    assert values["process_open_fds"] >= 5
    assert values[f'dashscope_proxy_build_info{{version="{__version__}"}}'] == 1
