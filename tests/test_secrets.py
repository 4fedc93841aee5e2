"""No file the repository ships holds a working secret.

Every tracked (or new, not ignored) YAML / JSON / Markdown / env / Dockerfile / Compose file is
scanned:

- no 64-hex value (a `key_sha256` above all) is the SHA-256 of a common password or of a key
  the repository itself uses (the Compose demo keys, the test keys, the simulator's key): such
  a digest is a working key for anyone who guesses it;
- gateway configs (files, ConfigMap-embedded ones, Markdown-free YAML) hold client keys,
  upstream keys and Redis passwords only as `${VAR}` references;
- Kubernetes Secrets hold placeholders, never values;
- env files hold no value for a variable named like a secret.

The scanners are tested on synthetic files too, so a check that silently matches nothing
fails here rather than passing forever.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.config import parse_config, sha256_hex
from proxy.simulator.__main__ import DEFAULT_KEY as SIM_KEY
from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY

REPO = Path(__file__).resolve().parent.parent

COMMON_PASSWORDS = (
    "password",
    "Password",
    "password1",
    "Password1",
    "passw0rd",
    "p@ssw0rd",
    "123456",
    "12345678",
    "123456789",
    "1234567890",
    "12345",
    "1234",
    "111111",
    "000000",
    "123123",
    "654321",
    "admin",
    "admin123",
    "administrator",
    "root",
    "toor",
    "secret",
    "secret123",
    "changeme",
    "changeit",
    "letmein",
    "welcome",
    "welcome1",
    "test",
    "test123",
    "testing",
    "demo",
    "demo123",
    "example",
    "qwerty",
    "qwerty123",
    "abc123",
    "iloveyou",
    "monkey",
    "dragon",
    "master",
    "football",
    "baseball",
    "sunshine",
    "princess",
    "shadow",
    "superman",
    "trustno1",
    "guest",
    "default",
    "key",
    "apikey",
    "api-key",
    "token",
    "dashscope",
    "dashscope-proxy",
)
# The placeholders the manifests ship: fine as a Secret's value, a working key as a digest.
PLACEHOLDERS = ("sk-replace-me", "replace-me")
# Keys that work somewhere in this repository (tests, the simulator, the Compose demo).
REPO_KEYS = (KEY_A, KEY_B, UPSTREAM_KEY, SIM_KEY)

TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".md", ".env"}
HEX64 = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
KEY_SHA256 = re.compile(r"key_sha256\W{0,6}([0-9A-Fa-f]{64})(?![0-9A-Fa-f])")
VAR_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
# What a Secret value must look like: obviously not a working value.
PLACEHOLDER = re.compile(r"replace|placeholder|<[^>]+>|\.\.\.", re.IGNORECASE)
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN", re.IGNORECASE)


# ------------------------------------------------------------------------ what is shipped


def is_scanned(path: Path) -> bool:
    name = path.name
    return (
        path.suffix in TEXT_SUFFIXES
        or name.startswith("Dockerfile")
        or name == ".env"
        or name.startswith(".env.")
        or "compose" in name
    )


def is_env_file(path: Path) -> bool:
    return path.name == ".env" or path.name.startswith(".env.") or path.suffix == ".env"


def shipped_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore (so a file is checked before its commit)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [REPO / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a checkout: walk it instead
        skip = {".git", ".venv", "node_modules", "__pycache__"}
        paths = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            paths += [Path(root) / f for f in files]
    return sorted(p for p in paths if p.is_file() and is_scanned(p))


def known_digests() -> dict[str, str]:
    """SHA-256 digest -> the guessable value it is the digest of."""
    compose_env: list[str] = []
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        compose_env += [str(v) for v in env.values()]
    values = {*COMMON_PASSWORDS, *PLACEHOLDERS, *REPO_KEYS, *compose_env}
    return {sha256_hex(v): v for v in values}


# ------------------------------------------------------------------------ scanners


def guessable_digests(text: str, digests: dict[str, str]) -> list[str]:
    return [
        f"{m.group(0)} = sha256({digests[m.group(0).lower()]!r})"
        for m in HEX64.finditer(text)
        if m.group(0).lower() in digests
    ]


def yaml_docs(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def gateway_configs(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping shaped like a gateway config, also inside strings (ConfigMap data)."""
    if isinstance(node, dict):
        if isinstance(node.get("keys"), list) or isinstance(node.get("upstreams"), list):
            yield node
        for value in node.values():
            yield from gateway_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from gateway_configs(value)
    elif isinstance(node, str) and re.search(r"^(keys|upstreams):", node, re.MULTILINE):
        try:
            for doc in yaml_docs(node):
                yield from gateway_configs(doc)
        except yaml.YAMLError:
            pass


def plain_secrets_in_config(config: dict[str, Any]) -> list[str]:
    problems = []
    for i, key in enumerate(config.get("keys") or []):
        if isinstance(key, dict) and "key" in key and not VAR_REF.match(str(key["key"])):
            problems.append(f"keys[{i}].key is a plain value, not ${{VAR}}")
    for i, upstream in enumerate(config.get("upstreams") or []):
        api_key = upstream.get("api_key") if isinstance(upstream, dict) else None
        if api_key is not None and not VAR_REF.match(str(api_key)):
            problems.append(f"upstreams[{i}].api_key is a plain value, not ${{VAR}}")
    state = config.get("state")
    if isinstance(state, dict) and isinstance(state.get("url"), str):
        password = urlsplit(state["url"]).password
        if password is not None and not VAR_REF.match(password):
            problems.append("state.url holds a plain password, not ${VAR}")
    return problems


def secret_values(doc: Any) -> Iterator[tuple[str, str]]:
    if not (isinstance(doc, dict) and doc.get("kind") == "Secret"):
        return
    for name, value in (doc.get("stringData") or {}).items():
        yield name, str(value)
    for name, value in (doc.get("data") or {}).items():
        yield name, base64.b64decode(str(value)).decode(errors="replace")


def working_secret_values(doc: Any) -> list[str]:
    return [
        f"{doc['metadata']['name']}.{name}: {value!r} is not a placeholder"
        for name, value in secret_values(doc)
        if not PLACEHOLDER.search(value) or value in COMMON_PASSWORDS
    ]


def env_file_secrets(text: str) -> list[str]:
    problems = []
    for line in text.splitlines():
        name, sep, value = line.strip().removeprefix("export ").partition("=")
        value = value.strip().strip("'\"")
        if not sep or name.startswith("#") or not SECRET_NAME.search(name) or not value:
            continue
        if not (VAR_REF.match(value) or PLACEHOLDER.search(value)):
            problems.append(f"{name} has a value")
    return problems


# ------------------------------------------------------------------------ the scanners bite


def test_the_scanners_find_what_they_look_for() -> None:
    digests = known_digests()
    leaked = hashlib.sha256(b"password").hexdigest()
    assert guessable_digests(f'key_sha256: "{leaked}"', digests) == [
        f"{leaked} = sha256('password')"
    ]
    assert guessable_digests(f"KEY_SHA256={leaked.upper()}", digests)
    assert guessable_digests(f'"key_sha256": "{sha256_hex(KEY_B)}"', digests)
    assert guessable_digests(sha256_hex(PLACEHOLDERS[0]), digests)
    assert not guessable_digests(f'key_sha256: "{sha256_hex("x" * 40)}"', digests)

    cm = """
kind: ConfigMap
data:
  config.yaml: |
    upstreams:
      - {name: a, base_url: "http://x/api/v1", api_key: sk-0123456789}
    keys:
      - {name: t, key: real-key-123456}
      - {name: u, key: "${U_KEY}"}
    state: {backend: redis, url: "redis://:hunter22@redis:6379/0"}
"""
    (config,) = [c for d in yaml_docs(cm) for c in gateway_configs(d)]
    assert plain_secrets_in_config(config) == [
        "keys[0].key is a plain value, not ${VAR}",
        "upstreams[0].api_key is a plain value, not ${VAR}",
        "state.url holds a plain password, not ${VAR}",
    ]
    fine = "keys: [{name: t, key: '${T}'}]\nstate: {url: 'redis://:${P}@r:6379/0'}\n"
    (config,) = gateway_configs(yaml.safe_load(fine))
    assert plain_secrets_in_config(config) == []

    secret = {
        "kind": "Secret",
        "metadata": {"name": "s"},
        "stringData": {"A": "sk-live-0123", "B": "sk-replace-me"},
        "data": {"C": base64.b64encode(b"changeme").decode()},
    }
    assert working_secret_values(secret) == [
        "s.A: 'sk-live-0123' is not a placeholder",
        "s.C: 'changeme' is not a placeholder",
    ]
    assert env_file_secrets("# c\nTEAM_A_KEY=abc\nX=1\nB_TOKEN=${T}\nC_PASSWORD=\n") == [
        "TEAM_A_KEY has a value"
    ]


# ------------------------------------------------------------------------ the repository


def test_the_scan_covers_the_configs_and_manifests() -> None:
    files = {p.relative_to(REPO).as_posix() for p in shipped_files()}
    for path in (
        "config/example.yaml",
        "docker-compose.yml",
        "deploy/compose/gateway.yaml",
        "deploy/kubernetes/standalone/configmap.yaml",
        "deploy/kubernetes/standalone/secret.example.yaml",
        "deploy/kubernetes/sidecar/configmap.yaml",
        "README.md",
    ):
        assert path in files, path
    assert not any(p.startswith((".venv/", ".git/")) for p in files)


def test_no_shipped_digest_is_a_guessable_key() -> None:
    digests = known_digests()
    problems = []
    found = 0
    for path in shipped_files():
        text = path.read_text(errors="replace")
        found += len(KEY_SHA256.findall(text))
        problems += [f"{path.relative_to(REPO)}: {p}" for p in guessable_digests(text, digests)]
    assert found >= 1, "no key_sha256 found at all: the scan is broken"
    assert not problems, "working keys shipped as digests:\n" + "\n".join(problems)


def test_configs_and_manifests_hold_secrets_only_as_var_references() -> None:
    problems = []
    configs = secrets = 0
    for path in shipped_files():
        rel = path.relative_to(REPO)
        text = path.read_text(errors="replace")
        if is_env_file(path):
            problems += [f"{rel}: {p}" for p in env_file_secrets(text)]
        if path.suffix not in (".yaml", ".yml"):
            continue
        for doc in yaml_docs(text):
            for config in gateway_configs(doc):
                configs += 1
                problems += [f"{rel}: {p}" for p in plain_secrets_in_config(config)]
            secrets += any(True for _ in secret_values(doc))
            problems += [f"{rel}: {p}" for p in working_secret_values(doc)]
    assert configs >= 4, configs  # example, compose, standalone and sidecar ConfigMaps
    assert secrets >= 1, "secret.example.yaml was not seen"
    assert not problems, "\n".join(problems)


def test_compose_sends_the_simulator_only_the_simulators_key() -> None:
    # The demo keys in docker-compose.yml work only against the simulator; a real DashScope
    # key there would be sent to it. The only upstream key Compose may carry is the
    # simulator's own (or a ${VAR} from the shell).
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    upstream_key = str(services["gateway"]["environment"]["DASHSCOPE_API_KEY"])
    assert upstream_key == SIM_KEY or VAR_REF.match(upstream_key), upstream_key
    assert "--key" not in services["simulator"].get("command", [])  # so SIM_KEY is accepted


def test_example_config_is_valid_listens_locally_and_holds_no_secret() -> None:
    text = (REPO / "config" / "example.yaml").read_text()
    env = {v: f"placeholder-{v.lower()}-value" for v in re.findall(r"\$\{(\w+)\}", text)}
    config = parse_config(text, env)
    # Copied as is, the example must not expose a gateway on every interface.
    assert config.server.host in ("127.0.0.1", "::1", "localhost"), config.server.host
    raw = yaml.safe_load(text)
    for key in raw["keys"]:
        assert "key_sha256" in key or VAR_REF.match(key["key"]), key["name"]
    assert "hash-key" in text  # the comment says how to make a digest of your own


def test_the_gateway_hashes_keys_as_the_scan_does() -> None:
    # The scan is only right if the gateway compares sha256(utf-8 key) in lower-case hex.
    for value in ("password", KEY_A, "pässwörd"):
        assert sha256_hex(value) == hashlib.sha256(value.encode()).hexdigest()
