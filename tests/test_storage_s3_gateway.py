"""`storage.backend: s3` end to end: gateway processes sharing one bucket (moto's server).

Two replicas with the same `storage:` section (bucket, prefix, signing key) each serve the
images the other delivered; a restarted gateway loses nothing; a store that is down costs
the client neither its image (DashScope's URL stays, marked degraded) nor the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.resilience_support import MM, A, GatewayProcess, body, team_a_yaml
from tests.s3_support import BUCKET, MotoServer, moto_server  # noqa: F401 - the fixture
from tests.support import Live

PREFIX = "replicas/"
MODEL = "qwen-image-2.0"


def replica_yaml(sim: Live, moto: MotoServer, workdir: Path, name: str) -> str:
    return team_a_yaml(
        sim.url,
        usage_log=workdir / f"{name}-usage.jsonl",
        state=f"  path: {workdir / name}.db",
        extra=moto.storage_yaml(prefix=PREFIX),
    )


@pytest.fixture
def replicas(
    sim: Live,
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> Iterator[list[GatewayProcess]]:
    started = [
        GatewayProcess(replica_yaml(sim, moto_server, tmp_path, name), tmp_path, name)
        for name in ("one", "two")
    ]
    yield started
    for gw in started:
        gw.stop()


def generate(gw: GatewayProcess, prompt: str) -> tuple[requests.Response, str]:
    """One native sync generation through `gw`: the answer and its image URL."""
    answer = requests.post(gw.url + MM, json=body(prompt, MODEL), headers=A, timeout=60)
    assert answer.status_code == 200, answer.text
    content = answer.json()["output"]["choices"][0]["message"]["content"]
    return answer, next(part["image"] for part in content if "image" in part)


def on(gw: GatewayProcess, link: str) -> str:
    """The same link, asked of another gateway (what a load balancer would do)."""
    parts = urlsplit(link)
    return f"{gw.url}{parts.path}?{parts.query}"


def images_counted(gw: GatewayProcess) -> float:
    return gw.metric("dashscope_proxy_images_total", key="team-a", model=MODEL)


def stored_keys(moto: MotoServer) -> list[str]:
    client = moto.client()
    try:
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)
    finally:
        client.close()
    return [o["Key"] for o in listing.get("Contents", [])]


def test_an_image_delivered_by_one_replica_is_served_by_the_other(
    replicas: list[GatewayProcess],
    sim: Live,
    moto_server: MotoServer,  # noqa: F811
) -> None:
    one, two = replicas
    answer, link = generate(one, "a lighthouse")
    assert "X-DashScope-Proxy-Storage" not in answer.headers
    assert link.startswith(one.url + "/images/")
    name = urlsplit(link).path.rpartition("/")[2]
    assert stored_keys(moto_server).count(PREFIX + name) == 1

    # DashScope's own URL is gone: what the links serve comes from the bucket.
    assert requests.post(sim.url + "/_sim/expire-images", timeout=5).status_code == 200
    first = requests.get(link, timeout=10)
    second = requests.get(on(two, link), timeout=10)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and first.content.startswith(b"\x89PNG")
    assert first.headers["ETag"] == second.headers["ETag"]
    assert second.headers["Content-Type"] == "image/png"
    ranged = requests.get(on(two, link), headers={"Range": "bytes=0-7"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == first.content[:8]
    assert two.metric("dashscope_proxy_stored_images_total", backend="s3") == 0
    assert one.metric("dashscope_proxy_stored_images_total", backend="s3") == 1


def test_a_restart_loses_nothing(
    replicas: list[GatewayProcess],
    sim: Live,
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    one, two = replicas
    _, link = generate(one, "a harbour at dawn")
    assert requests.post(sim.url + "/_sim/expire-images", timeout=5).status_code == 200
    before = requests.get(link, timeout=10)
    assert before.status_code == 200
    for gw in replicas:
        gw.stop()
    again = GatewayProcess(replica_yaml(sim, moto_server, tmp_path, "one"), tmp_path, "again")
    try:
        after = requests.get(on(again, link), timeout=10)
        assert after.status_code == 200
        assert after.content == before.content
    finally:
        again.stop()


def test_a_stopped_store_degrades_answers_but_keeps_the_image_and_the_count(
    replicas: list[GatewayProcess],
    sim: Live,
    moto_server: MotoServer,  # noqa: F811
) -> None:
    one, two = replicas
    _, kept_link = generate(one, "a kept image")
    counted = images_counted(two)
    moto_server.stop()
    try:
        answer, url = generate(two, "a lost store")
        assert answer.headers["X-DashScope-Proxy-Storage"] == "degraded"
        assert url.startswith(sim.url)  # DashScope's own URL, which still works
        assert requests.get(url, timeout=10).content.startswith(b"\x89PNG")
        assert images_counted(two) == counted + 1
        assert two.metric("dashscope_proxy_storage_errors_total", backend="s3", reason="store") >= 1
        # A link to an image kept earlier: the store is down, so "try again", not "gone".
        unavailable = requests.get(on(two, kept_link), timeout=10)
        assert unavailable.status_code == 503
        assert "Retry-After" in unavailable.headers
    finally:
        moto_server.restart()  # empty again: moto keeps objects in memory

    # Back up (same client, no restart of the gateway): answers are kept again.
    answer, link = generate(two, "the store is back")
    assert "X-DashScope-Proxy-Storage" not in answer.headers
    assert requests.get(on(one, link), timeout=10).status_code == 200


def test_a_gateway_started_while_the_store_is_down_keeps_images_once_it_is_up(
    sim: Live,
    moto_server: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    moto_server.stop()
    try:
        gw = GatewayProcess(replica_yaml(sim, moto_server, tmp_path, "early"), tmp_path, "early")
    finally:
        moto_server.restart()
    try:
        answer, link = generate(gw, "a store that came up late")
        assert "X-DashScope-Proxy-Storage" not in answer.headers
        assert link.startswith(gw.url + "/images/")
        assert requests.get(link, timeout=10).content.startswith(b"\x89PNG")
    finally:
        gw.stop()
