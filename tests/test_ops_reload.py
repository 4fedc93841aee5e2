"""Config reload in a real gateway process: file edits, SIGHUP, ConfigMap symlink swaps,
broken configs, restart-only fields. Requests in flight finish on the config they started with."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.config import file_signature, load_config, parse_config
from proxy.ops.reload import describe_changes, install_reloader, restart_required
from tests.conftest import KEY_A, UPSTREAM_KEY, gateway_yaml
from tests.ops_support import (
    MM,
    GatewayProcess,
    Launcher,
    body,
    in_background,
    launching,
    wait_for,
    write_atomically,
)
from tests.support import Live, LoopThread

KEY_C = "gw-team-c-secret-0003"
TEAM_C = f"""  - name: team-c
    key: {KEY_C}
"""
RELOADS = "dashscope_proxy_config_reloads_total"
LAST_OK = "dashscope_proxy_config_last_reload_successful"
LAST_TS = "dashscope_proxy_config_last_reload_success_timestamp_seconds"
FAST_POLL = ("--config-poll-seconds", "0.25")


@pytest.fixture
def launcher(sim: Live, tmp_path: Path) -> Iterator[Launcher]:
    with launching(sim, tmp_path) as launch:
        yield launch


def with_key_c(launch: Launcher, extra: str = "", server: str = "") -> str:
    """The launcher's config plus key team-c (inserted at the end of `keys:`)."""
    text = launch.yaml(extra, server)
    return text.replace("state:\n", TEAM_C + "state:\n", 1)


def slow_request(gw: GatewayProcess, seconds: int = 2) -> tuple[object, list[object]]:
    t, result = in_background(lambda: gw.generate(KEY_A, f"slow [sim:slow={seconds}]"))
    wait_for(
        lambda: gw.metric("dashscope_proxy_inflight_requests", route="multimodal-generation") == 1,
        10,
        "the slow request",
    )
    return t, result


def test_file_edit_adds_key_while_slow_request_is_in_flight(launcher: Launcher) -> None:
    gw = launcher.start("", *FAST_POLL)
    assert gw.generate(KEY_C).status_code == 401
    t, result = slow_request(gw, 4)

    write_atomically(launcher.config_path, with_key_c(launcher))
    wait_for(lambda: gw.generate(KEY_C).status_code == 200, 10, "the new key to work")
    reloaded_while_in_flight = t.is_alive()  # type: ignore[attr-defined]

    t.join(15)  # type: ignore[attr-defined]
    slow = result[0]
    assert isinstance(slow, requests.Response) and slow.status_code == 200, slow
    assert reloaded_while_in_flight, "the slow request finished before the reload"
    assert gw.metric(RELOADS, result="success") == 1
    assert gw.metric(RELOADS, result="failure") == 0
    assert gw.metric(LAST_OK) == 1
    lines = gw.access_lines()
    slow_line = next(x for x in lines if x["latency_ms"] > 2500)
    assert slow_line["key"] == "team-a" and slow_line["status"] == 200
    assert slow_line["images"] == 1
    assert any(x["key"] == "team-c" and x["status"] == 200 for x in lines)
    assert "config reloaded (file changed)" in gw.stderr_text()
    assert "keys +team-c" in gw.stderr_text()
    # Both requests were counted under the right key.
    assert gw.metric("dashscope_proxy_images_total", key="team-a", model="qwen-image-2.0") == 1
    assert gw.metric("dashscope_proxy_images_total", key="team-c", model="qwen-image-2.0") >= 1


def test_sighup_adds_key_and_upstream_with_file_watching_off(launcher: Launcher) -> None:
    gw = launcher.start("", "--config-poll-seconds", "0")
    t, result = slow_request(gw)
    new_upstream = f"""  - name: sim-b
    base_url: {launcher.sim.url}/api/v1
    api_key: {UPSTREAM_KEY}
    models: ["qwen-image-2.0-pro"]
    priority: -1
"""
    text = with_key_c(launcher).replace("keys:\n", new_upstream + "keys:\n", 1)
    write_atomically(launcher.config_path, text)
    # Watching is off: nothing changes until the signal.
    assert gw.generate(KEY_C).status_code == 401

    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.generate(KEY_C).status_code == 200, 10, "the new key to work")
    assert gw.generate(KEY_A, model="qwen-image-2.0-pro").status_code == 200
    t.join(15)  # type: ignore[attr-defined]
    assert isinstance(result[0], requests.Response) and result[0].status_code == 200
    assert gw.metric(RELOADS, result="success") == 1
    routed = [x["upstream"] for x in gw.access_lines() if x["model"] == "qwen-image-2.0-pro"]
    assert routed == ["sim-b"]  # the new upstream works through the same ClientSession
    assert "config reloaded (SIGHUP)" in gw.stderr_text()
    assert "upstreams +sim-b" in gw.stderr_text()


def test_broken_config_is_rejected_and_the_old_one_keeps_serving(launcher: Launcher) -> None:
    gw = launcher.start("", *FAST_POLL)
    started = gw.metric(LAST_TS)
    assert started > 0 and gw.metric(LAST_OK) == 1
    secret_number = "987654321987654"
    broken = (
        launcher.yaml()
        .replace(f"api_key: {UPSTREAM_KEY}", f"api_key: {secret_number}")
        .replace("  port: 0\n", "  port: 0\n  workerz: 2\n  backlog: -5\n")
    )
    write_atomically(launcher.config_path, broken)
    wait_for(lambda: gw.metric(RELOADS, result="failure") == 1, 10, "the rejection")

    assert gw.generate(KEY_A).status_code == 200  # the old config still serves
    assert gw.metric(LAST_OK) == 0
    assert gw.metric(LAST_TS) == started
    assert gw.metric(RELOADS, result="success") == 0
    err = gw.stderr_text()
    assert "3 problem(s)" in err
    for location in (
        "server.workerz: unknown field",
        "server.backlog: must be",
        "upstreams[0].api_key: must be a string",
    ):
        assert location in err, err
    assert secret_number not in err  # a secret typed as a number is not echoed
    assert UPSTREAM_KEY not in err

    # Not valid YAML at all, by SIGHUP: rejected too.
    write_atomically(launcher.config_path, "server: [unclosed\n")
    wait_for(lambda: gw.metric(RELOADS, result="failure") == 2, 10, "the second rejection")
    assert "not valid YAML" in gw.stderr_text()
    assert gw.generate(KEY_A).status_code == 200

    # Fixed: accepted, and the status recovers.
    write_atomically(launcher.config_path, with_key_c(launcher))
    wait_for(lambda: gw.metric(LAST_OK) == 1, 10, "the good config")
    assert gw.metric(RELOADS, result="success") == 1
    assert gw.metric(LAST_TS) > started
    assert gw.generate(KEY_C).status_code == 200


def test_configmap_symlink_swap_and_restart_only_fields(launcher: Launcher, tmp_path: Path) -> None:
    # The layout kubelet gives a ConfigMap volume: config.yaml -> ..data/config.yaml,
    # ..data -> ..<timestamp>; an update writes a new directory and swaps ..data.
    mount = tmp_path / "configmap"
    (mount / "..2026_01_01").mkdir(parents=True)
    (mount / "..2026_01_01" / "config.yaml").write_text(launcher.yaml())
    os.symlink("..2026_01_01", mount / "..data")
    os.symlink("..data/config.yaml", mount / "config.yaml")
    gw = GatewayProcess(mount / "config.yaml", *FAST_POLL)
    launcher.running.append(gw)

    (mount / "..2026_01_02").mkdir()
    (mount / "..2026_01_02" / "config.yaml").write_text(
        with_key_c(launcher, server="  workers: 3\n  shutdown_grace_seconds: 5\n")
    )
    os.symlink("..2026_01_02", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")  # atomic, as kubelet does
    wait_for(lambda: gw.generate(KEY_C).status_code == 200, 10, "the new key to work")
    assert gw.metric(RELOADS, result="success") == 1
    err = gw.stderr_text()
    assert "takes effect only after a restart: server.workers: 1 -> 3" in err
    assert "takes effect only after a restart: server.shutdown_grace_seconds" in err

    # A file that changed but means the same config is not a reload.
    target = mount / "..2026_01_02" / "config.yaml"
    target.write_text(target.read_text() + "\n# a comment\n")
    requests.get(gw.url + "/healthz", timeout=5)
    wait_for(
        lambda: (
            "changed but its content did not" in gw.stderr_text()
            or gw.metric(RELOADS, result="success") != 1
        ),
        3,
        "the watcher to look",
    )
    assert gw.metric(RELOADS, result="success") == 1


def test_restart_required_and_change_summary_are_pure_and_name_no_secret(tmp_path: Path) -> None:
    base_text = gateway_yaml("http://127.0.0.1:1", tmp_path / "s.db")
    base = parse_config(base_text, {})
    assert restart_required(base, base) == []
    assert describe_changes(base, base) == "no effective change"

    changed = parse_config(
        with_key_c_text(base_text)
        .replace(
            "  port: 0\n",
            "  port: 9090\n  workers: 2\n  max_body_bytes: 99999999\n  usage_log: /tmp/u.jsonl\n",
        )
        .replace(
            f"api_key: {UPSTREAM_KEY}",
            f"api_key: {UPSTREAM_KEY}-rotated\n    max_connections: 20000",
        )
        .replace(
            f"  path: {tmp_path / 's.db'}",
            "  backend: redis\n  url: redis://:hunter2-password@redis:6379/0",
        ),
        {},
    )
    lines = restart_required(base, changed)
    text = "\n".join(lines)
    for field in (
        "server.port: 0 -> 9090",
        "server.workers: 1 -> 2",
        "server.max_body_bytes: raised",
        "state.backend",
        "state.url: changed",
        "upstreams[].max_connections: raised to 20000",
    ):
        assert field in text, field
    assert "hunter2" not in text
    assert "usage_log" not in text  # a reload opens, moves or closes the usage log
    summary = describe_changes(base, changed)
    assert summary == "keys +team-c; upstreams ~sim; server changed", summary
    assert UPSTREAM_KEY not in summary

    # Lowering what is checked per request applies at once: no restart needed.
    smaller = parse_config(
        base_text.replace("  port: 0\n", "  port: 0\n  max_body_bytes: 4096\n"), {}
    )
    assert restart_required(base, smaller) == []


def with_key_c_text(text: str) -> str:
    return text.replace("state:\n", TEAM_C + "state:\n", 1)


def test_file_signature_follows_symlinks(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("x")
    b.write_text("x")
    link = tmp_path / "config.yaml"
    os.symlink(a, link)
    first = file_signature(link)
    assert first is not None and first[0] == str(a)
    os.remove(link)
    os.symlink(b, link)
    assert file_signature(link) != first  # same size and maybe mtime: the target differs
    os.remove(b)
    assert file_signature(link) is None  # a dangling link: keep the last good config


def test_a_change_while_the_process_starts_is_not_missed(
    loop_thread: LoopThread, sim: Live, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    text = gateway_yaml(sim.url, tmp_path / "s.db")
    path.write_text(text)
    signature = file_signature(path)  # taken before the read, as __main__ does
    config = load_config(path)
    write_atomically(path, with_key_c_text(text))  # lands before the watcher starts
    app = create_app(config, registry=CollectorRegistry(), access_stream=io.BytesIO())
    install_reloader(app, path, poll_seconds=0.1, loaded_signature=signature)
    live = loop_thread.serve(app)
    try:

        def key_c_works() -> bool:
            return (
                requests.post(
                    live.url + MM,
                    json=body(),
                    timeout=10,
                    headers={"Authorization": f"Bearer {KEY_C}"},
                ).status_code
                == 200
            )

        wait_for(key_c_works, 10, "the change made during startup")
    finally:
        loop_thread.stop(live)
