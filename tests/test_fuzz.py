"""Adversarial inputs against a live gateway in front of the simulator (hypothesis): generated
bodies, headers, paths and queries on every endpoint of docs/openapi.yaml. No input may get a
gateway-originated 5xx, crash the gateway, or see a secret; metric series stay bounded whatever
model names and paths clients invent. Bounded to a few seconds per test."""

from __future__ import annotations

import json
import random
import string
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.fronts.ops import load_document
from proxy.metrics import KNOWN_MODELS
from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, Gateway, GatewayFactory

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECRETS = (KEY_A, KEY_B, UPSTREAM_KEY)
METHODS = {"get", "post", "put", "delete", "patch"}
ENDPOINTS = sorted(
    (method.upper(), path)
    for path, item in load_document()["paths"].items()
    for method in item
    if method in METHODS
)

printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=16,
)
models = st.sampled_from([*KNOWN_MODELS, "gpt-image-1", "", "x" * 200]) | st.text(max_size=30)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", 5]),
            "content": st.text(max_size=60)
            | st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "text": st.text(max_size=60) | json_value,
                        "image": printable | json_value,
                    },
                ),
                max_size=3,
            ),
        }
    ),
    max_size=2,
)
native_body = st.fixed_dictionaries(
    {"model": models | json_value},
    optional={
        "input": st.fixed_dictionaries(
            {},
            optional={
                "messages": messages,
                "prompt": st.text(max_size=80) | json_value,
                "negative_prompt": st.text(max_size=20),
            },
        )
        | json_value,
        "parameters": st.dictionaries(
            st.sampled_from(
                [
                    "n",
                    "size",
                    "seed",
                    "watermark",
                    "prompt_extend",
                    "enable_interleave",
                    "max_images",
                    "stream",
                ]
            ),
            st.integers(-5, 10) | printable | st.booleans() | json_value,
            max_size=4,
        )
        | json_value,
    },
)
openai_body = st.fixed_dictionaries(
    {},
    optional={
        "model": models | json_value,
        "prompt": st.text(max_size=80) | json_value,
        "n": st.integers(-3, 12) | printable,
        "size": st.sampled_from(
            ["1024x1024", "1328x1328", "1K", "auto", "1024×1024", "0x0", "99999x99999"]
        )
        | printable,
        "response_format": st.sampled_from(["url", "b64_json", "png"]) | json_value,
        "image": printable | st.lists(printable, max_size=2),
        "seed": json_value,
        "negative_prompt": json_value,
        "prompt_extend": json_value,
        "watermark": json_value,
        "stream": st.booleans(),
        "quality": json_value,
    },
)
bodies = (
    native_body.map(json.dumps)
    | openai_body.map(json.dumps)
    | json_value.map(json.dumps)
    | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
)
auth = (
    st.sampled_from(
        [
            f"Bearer {KEY_A}",
            f"Bearer {KEY_B}",
            f"bearer {KEY_A}",
            "Bearer nope",
            "Basic YWJj",
            "",
            f"Bearer {KEY_A}x",
            "Bearer " + "k" * 600,
        ]
    )
    | printable
)
header_name = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,24}\Z")
headers = st.dictionaries(
    header_name
    | st.sampled_from(
        [
            "X-DashScope-SSE",
            "X-DashScope-Async",
            "Content-Type",
            "X-DashScope-OssResourceResolve",
            "Content-Encoding",
            "X-DashScope-WorkSpace",
            "Accept",
            "Connection",
            "Expect",
        ]
    ),
    printable,
    max_size=5,
)
task_ids = (
    (st.uuids().map(str) | st.text(max_size=40))
    .map(lambda s: quote(s, safe=""))
    .filter(lambda s: s not in ("", ".", ".."))
)
query = st.dictionaries(
    st.sampled_from(
        [
            "page_no",
            "page_size",
            "status",
            "model_name",
            "start_time",
            "end_time",
            "action",
            "model",
        ]
    )
    | st.text(max_size=8),
    printable,
    max_size=4,
)


def check(gw: Gateway, r: requests.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    text = r.text + json.dumps(dict(r.headers))
    for secret in SECRETS:
        assert secret not in text
    if r.status_code >= 400 and r.content:
        json.loads(r.content)  # every error is a JSON body in one of the two dialects


@pytest.fixture
def session() -> requests.Session:
    with requests.Session() as s:
        yield s


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=bodies,
    auth=auth,
    extra=headers,
    task_id=task_ids,
    params=query,
)
def test_every_endpoint_with_generated_input(
    gateway: Gateway,
    session: requests.Session,
    endpoint: tuple[str, str],
    body: str,
    auth: str,
    extra: dict[str, str],
    task_id: str,
    params: dict[str, str],
) -> None:
    method, path = endpoint
    url = gateway.url + path.replace("{task_id}", task_id)
    hdrs = {**extra, "Authorization": auth}
    hdrs.pop("Content-Encoding", None)  # requests would not encode the body to match
    hdrs.pop("Expect", None)
    data = body.encode("utf-8", "surrogatepass") if method == "POST" else None
    try:
        r = session.request(method, url, data=data, headers=hdrs, params=params, timeout=30)
    except requests.exceptions.InvalidHeader:
        return  # not sendable (requests refuses it): never reached the gateway
    check(gateway, r)


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(["prompt", "model", "n", "size", "response_format", "watermark"])
        | st.text(max_size=8),
        st.text(max_size=40),
        max_size=5,
    ),
    files=st.lists(
        st.tuples(
            st.sampled_from(["image", "image[]", "mask", "other"]),
            st.binary(max_size=300),
            st.sampled_from(["image/png", "text/plain", ""]),
        ),
        max_size=3,
    ),
)
def test_multipart_edits(
    gateway: Gateway,
    session: requests.Session,
    fields: dict[str, str],
    files: list[tuple[str, bytes, str]],
) -> None:
    parts = [(name, ("f.png", data, ctype)) for name, data, ctype in files]
    r = session.post(
        gateway.url + "/v1/images/edits",
        data=fields,
        files=parts or None,
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )
    check(gateway, r)


@FUZZ
@given(
    path=st.lists(
        st.text(alphabet=string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;=", max_size=20),
        min_size=1,
        max_size=5,
    ),
    prefix=st.sampled_from(["/api/v1", "/v1", "/aliyun/v1", "", "/api/v1/services/aigc"]),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
)
def test_arbitrary_paths_and_methods(
    gateway: Gateway, session: requests.Session, path: list[str], prefix: str, method: str
) -> None:
    r = session.request(
        method,
        gateway.url + prefix + "/" + "/".join(path),
        headers={"Authorization": f"Bearer {KEY_A}"},
        data=b"{}",
        timeout=30,
    )
    check(gateway, r)


def test_metering_still_exact(gateway: Gateway, session: requests.Session) -> None:
    """A plain request on a fresh gateway: counted exactly once (the baseline the fuzz
    tests' gateways are held to by `check`)."""
    r = session.post(
        gateway.url + "/api/v1/services/aigc/multimodal-generation/generation",
        json={
            "model": "qwen-image-2.0",
            "input": {"messages": [{"role": "user", "content": [{"text": "a cat"}]}]},
        },
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )
    assert r.status_code == 200
    assert gateway.images("team-a", "qwen-image-2.0") == 1


def _series(gw: Gateway) -> dict[str, int]:
    counts: dict[str, int] = {}
    for family in gw.registry.collect():
        counts[family.name] = len(family.samples)
    return counts


def test_metric_series_stay_bounded(start_gateway: GatewayFactory) -> None:
    gw = start_gateway()
    rnd = random.Random(5)
    alphabet = string.ascii_lowercase + string.digits + ".-"

    def name() -> str:
        return "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 24)))

    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {KEY_A}"
        for i in range(1500):
            kind = i % 5
            if kind == 0:
                s.post(
                    gw.url + "/api/v1/services/aigc/multimodal-generation/generation",
                    json={
                        "model": name(),
                        "input": {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
                    },
                    timeout=30,
                )
            elif kind == 1:
                s.post(
                    gw.url + "/v1/images/generations",
                    json={"model": name(), "prompt": "x", "response_format": "url"},
                    timeout=30,
                )
            elif kind == 2:
                s.get(f"{gw.url}/api/v1/{name()}/{name()}", timeout=30)
            elif kind == 3:
                s.get(f"{gw.url}/api/v1/tasks/{name()}", params={"model_name": name()}, timeout=30)
            else:
                s.get(
                    gw.url + "/api/v1/uploads",
                    params={"action": "getPolicy", "model": name()},
                    timeout=30,
                )
    series = _series(gw)
    models = {
        s.labels["model"]
        for fam in gw.registry.collect()
        for s in fam.samples
        if "model" in s.labels
    }
    routes = {
        s.labels["route"]
        for fam in gw.registry.collect()
        for s in fam.samples
        if "route" in s.labels
    }
    # Only configured/known models or `other` (random names never succeed upstream).
    assert models <= {*KNOWN_MODELS, "other"}, models - {*KNOWN_MODELS, "other"}
    assert routes <= {r.name for r in gw.live.app.router.routes()} | {"unmatched"}, routes
    total = sum(series.values())
    assert total < 1500, series  # 1500 distinct names did not make 1500 series
