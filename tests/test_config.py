"""Config parsing: every problem at once, with its location; ${VAR}; keys and upstreams."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config, sha256_hex

MINIMAL = """
upstreams:
  - name: intl
    base_url: https://dashscope-intl.aliyuncs.com/api/v1
    api_key: ${DASHSCOPE_API_KEY}
keys:
  - name: team-a
    key: ${TEAM_A_KEY}
"""
ENV = {"DASHSCOPE_API_KEY": "sk-real-upstream", "TEAM_A_KEY": "team-a-secret"}


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, ENV if env is None else env)
    return exc.value.problems


def test_minimal_config_defaults() -> None:
    c = parse_config(MINIMAL, ENV)
    assert c.server.port == 8080 and c.server.host == "0.0.0.0"
    assert c.server.max_body_bytes == 32 * 1024 * 1024
    assert c.upstreams[0].api_key == "sk-real-upstream"
    assert c.upstreams[0].models == ("*",)
    assert c.keys[0].key_sha256 == sha256_hex("team-a-secret")
    assert c.state.backend == "local"
    assert c.openai.default_response_format == "b64_json"
    assert "sk-real-upstream" not in repr(c)  # secrets are not in reprs


def test_unset_variable_is_named_with_its_location() -> None:
    assert problems(MINIMAL, {"TEAM_A_KEY": "team-a-secret"}) == [
        "upstreams[0].api_key: environment variable DASHSCOPE_API_KEY is not set"
    ]


def test_every_problem_reported_at_once() -> None:
    text = """
server: {port: 99999, workers: 0, colour: blue}
upstreams:
  - name: a
    base_url: ftp://x
    api_key: k
  - name: a
    base_url: https://b/api/v1
    api_key: k2
    timeouts: {read: -1}
keys:
  - name: k1
    key: short
  - name: k1
    key_sha256: nothex
  - name: k3
    key: long-enough-1
    key_sha256: "KEYHASH"
  - name: k4
models:
  x: {mode: fast}
state: {backend: redis}
""".replace("KEYHASH", "a" * 64)
    got = problems(text)
    expected = [
        "server.colour: unknown field",
        "server.port: must be an integer >= 0 and <= 65535",
        "server.workers: must be an integer >= 1",
        "upstreams[0].base_url: must be an http(s) URL",
        "upstreams[1].name: duplicate of upstreams[0].name",
        "upstreams[1].timeouts.read: must be a number >= 0.001",
        "keys[0].key: must be at least 8 characters",
        "keys[1].key_sha256: must be 64 hex characters",
        "keys[1].name: duplicate of keys[0].name",
        "keys[2]: set either key or key_sha256, not both",
        "keys[3]: needs key or key_sha256",
        "models.x.mode: must be sync or async",
        "state.url: is required with backend: redis",
    ]
    for e in expected:
        assert any(p.startswith(e) for p in got), (e, got)
    assert len(got) == len(expected), got


def test_duplicate_secret_and_upstream_key_reuse() -> None:
    text = (
        MINIMAL
        + """
  - name: team-b
    key_sha256: "{digest}"
  - name: team-c
    key: sk-real-upstream
""".format(digest=sha256_hex("team-a-secret"))
    )
    got = problems(text)
    assert "keys[1]: same secret as keys[0]" in got
    assert "keys[2]: a client key must not equal an upstream api_key" in got


def test_yaml_syntax_error_has_line() -> None:
    got = problems("upstreams: [\n  - name: a\n")
    assert got[0].startswith("line ")


def test_globs_and_upstream_choice() -> None:
    text = """
upstreams:
  - {name: cn, base_url: "https://dashscope.aliyuncs.com/api/v1", api_key: a1234567,
     models: ["wan2.2-*"]}
  - {name: intl, base_url: "https://dashscope-intl.aliyuncs.com/api/v1", api_key: b1234567}
keys:
  - {name: k, key: kkkkkkkk1, models: ["qwen-image*"]}
"""
    c = parse_config(text, {})
    assert [u.name for u in c.upstreams_for("wan2.2-t2i-flash")] == ["cn", "intl"]
    assert [u.name for u in c.upstreams_for("qwen-image")] == ["intl"]
    assert c.keys[0].allows("qwen-image-2.0-pro") and not c.keys[0].allows("wan2.6-t2i")


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml", {})
    assert "cannot read" in exc.value.problems[0]


def test_cli_check_config_and_hash_key(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        MINIMAL.replace("${DASHSCOPE_API_KEY}", "sk-upstream-1").replace(
            "${TEAM_A_KEY}", "team-a-secret"
        )
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: []\nkeys: []\nbogus: 1\n")
    run = [sys.executable, "-m", "proxy"]
    ok = subprocess.run([*run, "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    ko = subprocess.run([*run, "check-config", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1
    assert "bogus: unknown field" in ko.stderr
    assert "upstreams: at least one upstream is required" in ko.stderr
    assert "keys: at least one key is required" in ko.stderr
    h = subprocess.run([*run, "hash-key"], input="team-a-secret\n", capture_output=True, text=True)
    assert h.stdout.strip() == sha256_hex("team-a-secret")


# Run as `python -c`: the packages named are made unimportable first, as on a machine
# installed without their extra.
WITHOUT = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from proxy.__main__ import main\n"
    "sys.exit(main(['check-config', sys.argv[2]]))\n"
)


def test_a_backend_whose_extra_is_missing_is_a_config_problem(tmp_path: Path) -> None:
    path = tmp_path / "extras.yaml"
    path.write_text(
        "upstreams: [{name: a, base_url: 'https://h/api/v1', api_key: k}]\n"
        "keys: [{name: t, key: team-a-secret}]\n"
        "state: {backend: redis, url: 'redis://127.0.0.1:6379/0'}\n"
        "storage: {backend: s3, bucket: images, signing_key: 0123456789abcdef}\n"
    )
    run = [sys.executable, "-c", WITHOUT]
    missing = subprocess.run([*run, "aiobotocore,redis", str(path)], capture_output=True, text=True)
    assert missing.returncode == 1, missing.stdout
    assert (
        "state.backend: redis needs redis, which is not installed: "
        "pip install 'dashscope-proxy[redis]'" in missing.stderr
    )
    assert (
        "storage.backend: s3 needs aiobotocore, which is not installed: "
        "pip install 'dashscope-proxy[s3]'" in missing.stderr
    )
    assert "2 problem(s)" in missing.stderr
    # The same file, with both extras installed (as the test extra does), is fine.
    installed = subprocess.run([*run, "none", str(path)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    assert "state backend redis" in installed.stdout
