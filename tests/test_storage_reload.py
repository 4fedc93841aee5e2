"""`storage:` and config reloads, in a real gateway process on SIGHUP: link parameters follow a
reload at once, turning storage off applies at once (links handed out keep working), and the
signing key never reaches a log line."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.ops_support import GatewayProcess, Launcher, launching, wait_for
from tests.storage_support import SIGNING_KEY, query_of, storage_yaml
from tests.support import Live


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def image_url(gw: GatewayProcess) -> tuple[str, requests.Response]:
    rsp = gw.generate()
    assert rsp.status_code == 200, rsp.text
    return rsp.json()["output"]["choices"][0]["message"]["content"][0]["image"], rsp


def reload(gw: GatewayProcess, launcher: Launcher, extra: str, count: int) -> None:
    launcher.config_path.write_text(launcher.yaml(extra))
    gw.signal(signal.SIGHUP)
    wait_for(
        lambda: gw.metric("dashscope_proxy_config_reloads_total", result="success") == count,
        10,
        "the reload",
    )


def test_link_parameters_follow_a_reload_and_storage_can_be_turned_off(
    launcher: Launcher, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    gw = launcher.start(storage_yaml(images, link_ttl_seconds=100))
    first, _ = image_url(gw)
    assert first.startswith(gw.url + "/images/")
    assert int(query_of(first)["expires"]) <= time.time() + 101

    reload(gw, launcher, storage_yaml(images, link_ttl_seconds=5000), 1)
    longer, _ = image_url(gw)
    assert int(query_of(longer)["expires"]) >= time.time() + 4000

    reload(gw, launcher, "", 2)  # storage: removed
    plain, rsp = image_url(gw)
    assert "/_sim/images/" in plain and "X-DashScope-Proxy-Storage" not in rsp.headers
    assert requests.get(first, timeout=5).status_code == 200  # handed out before: still works
    assert gw.metric("dashscope_proxy_images_total", key="team-a", model="qwen-image-2.0") == 3
    logs = gw.stderr_text() + gw.stdout_text()
    assert SIGNING_KEY not in logs
    assert "storage" in logs  # the reload names what changed


def test_turning_storage_on_by_reload_waits_for_a_restart(
    launcher: Launcher, tmp_path: Path
) -> None:
    gw = launcher.start()
    reload(gw, launcher, storage_yaml(tmp_path / "images"), 1)
    url, _ = image_url(gw)
    assert "/_sim/images/" in url  # not yet: the store opens at startup
    assert "/images/" not in url.replace("/_sim/images/", "")
    assert "storage: turned on" in gw.stderr_text() + gw.stdout_text()
