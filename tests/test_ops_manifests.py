"""The container image, Compose and Kubernetes files, parsed and checked (no Docker or
cluster needed): exec-form entrypoint, non-root, probes on the right paths and ports,
configs that the gateway accepts, selectors that select, grace periods that add up."""

from __future__ import annotations

import json
import py_compile
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, ServerConfig, parse_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cargo", "rustc")


# ------------------------------------------------------------------------ Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per build stage; line continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args.strip()))
    return stages


def test_dockerfile_multi_stage_slim_non_root_exec_form_with_healthcheck() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay in the build stage"
    final = stages[-1]
    base = final[0][1]
    assert "-slim" in base.split()[0], base
    get = {}
    for instruction, args in final:
        get.setdefault(instruction, []).append(args)

    # Only the built virtualenv comes from the build stage; nothing is built here.
    assert any(a.startswith("--from=build") for a in get["COPY"])
    final_runs = " ".join(get.get("RUN", []))
    assert "pip install" not in final_runs
    for tool in BUILD_TOOLS:
        assert not re.search(rf"\b{re.escape(tool)}\b", final_runs), tool

    (user,) = get["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (runAsNonRoot can check it)"

    (entrypoint,) = get["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["dashscope-proxy"], "exec form: signals reach the gateway"
    assert isinstance(json.loads(get["CMD"][-1]), list)  # exec form too
    assert get.get("STOPSIGNAL", ["SIGTERM"]) == ["SIGTERM"]

    (health,) = get["HEALTHCHECK"]
    exec_part = health[health.index("CMD") + 3 :].strip()
    probe = json.loads(exec_part)  # exec form, no shell needed in the image
    assert f"127.0.0.1:{ServerConfig().port}/healthz" in " ".join(probe)
    assert get["EXPOSE"] == [str(ServerConfig().port)]

    # What the build stage copies exists, and .dockerignore keeps the rest out.
    for instruction, args in stages[0]:
        if instruction == "COPY" and not args.startswith("--from"):
            for src in shlex.split(args)[:-1]:
                assert (REPO / src).exists(), src
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests", "*.db"):
        assert path in ignored, path


# ------------------------------------------------------------------------ Compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def parse_with(text: str, environ: dict[str, str]) -> Config:
    missing = set(_VAR.findall(text)) - set(environ)
    assert not missing, f"${{...}} not provided: {missing}"
    return parse_config(text, environ)


def test_compose_gateway_simulator_prometheus_grafana() -> None:
    services = compose()["services"]
    assert {"gateway", "simulator", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, (name, image)
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), (name, source)

    gw = services["gateway"]
    assert gw["build"] == "." and "8080:8080" in gw["ports"]
    config_path = gw["command"][gw["command"].index("--config") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    host_dir = mounts[str(Path(config_path).parent)]  # a directory mount: edits are seen
    assert (REPO / host_dir).is_dir()
    config = parse_with(
        (REPO / host_dir / Path(config_path).name).read_text(),
        {k: str(v) for k, v in gw["environment"].items()},
    )
    assert config.server.port == 8080 and config.server.host == "0.0.0.0"
    # Compose must wait longer than the gateway drains before it SIGKILLs.
    grace = int(gw["stop_grace_period"].rstrip("s"))
    assert grace > config.server.shutdown_grace_seconds
    assert "/readyz" in " ".join(gw["healthcheck"]["test"])

    sim = services["simulator"]
    sim_port = sim["command"][sim["command"].index("--port") + 1]
    (upstream,) = config.upstreams
    assert upstream.base_url == f"http://simulator:{sim_port}/api/v1"
    assert gw["depends_on"]["simulator"]["condition"] == "service_healthy"

    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["gateway:8080"]

    graf = services["grafana"]
    targets = {v.split(":")[1]: REPO / v.split(":")[0] for v in graf["volumes"]}
    ds = yaml.safe_load(
        (targets["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text()
    )
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load(
        (targets["/etc/grafana/provisioning/dashboards"] / "dashscope-proxy.yml").read_text()
    )
    dash_dir = prov["providers"][0]["options"]["path"]
    dash_files = [t for t in targets if t.startswith(dash_dir)]
    assert dash_files and json.loads(targets[dash_files[0]].read_text())["uid"]
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in targets

    traffic = REPO / "deploy/compose/traffic.py"
    py_compile.compile(str(traffic), doraise=True)
    for var in re.findall(r'os\.environ\["([A-Z_]+)"\]', traffic.read_text()):
        assert var in services["traffic"]["environment"], var


# ------------------------------------------------------------------------ Kubernetes


def k8s_docs(variant: str) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / variant / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = K8S / variant / resource
        assert path.exists(), resource
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], d
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_gateway_container(c: dict[str, Any], pod: dict[str, Any], config: Config) -> None:
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert config.server.port in ports.values()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports[get["port"]] == config.server.port, probe
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert sc["runAsNonRoot"] is True
    assert sc.get("runAsUser", 10001) != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_mount = mounts["/etc/dashscope-proxy"]
    assert "subPath" not in config_mount, "subPath mounts never see ConfigMap updates"
    assert c["args"] == ["--config", "/etc/dashscope-proxy/config.yaml"]
    # Writable places on a read-only root: the state file's directory and /tmp.
    assert str(Path(config.state.path).parent) in mounts and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        assert m["name"] in volumes


def config_from(
    docs: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any]
) -> Config:
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/dashscope-proxy")
    cm = one(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    env = {e["name"]: f"placeholder-value-of-{e['name']}" for e in container["env"]}
    return parse_with(cm["data"]["config.yaml"], env)


def test_kubernetes_standalone() -> None:
    docs = k8s_docs("standalone")
    deploy = one(docs, "Deployment", "dashscope-proxy")
    pod = deploy["spec"]["template"]["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert selects(deploy["spec"]["selector"]["matchLabels"], labels)
    (c,) = pod["containers"]
    config = config_from(docs, c, pod)
    check_gateway_container(c, pod, config)
    assert config.server.workers == 1  # one process per pod; scale with replicas

    # SIGKILL comes at terminationGracePeriodSeconds: after the preStop sleep and the drain.
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + config.server.shutdown_grace_seconds + 5
    # Replicas share state through Redis, and the URL points at a Service that exists.
    if deploy["spec"]["replicas"] > 1:
        assert config.state.backend == "redis"
        host = re.match(r"redis://([^:/]+)", config.state.url or "")
        assert host and one(docs, "Service", host.group(1))

    # The Secret the pod reads is the one documented in secret.example.yaml.
    example = yaml.safe_load((K8S / "standalone/secret.example.yaml").read_text())
    for e in c["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == example["metadata"]["name"] and ref["key"] in example["stringData"]

    svc = one(docs, "Service", "dashscope-proxy")
    assert selects(svc["spec"]["selector"], labels)
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)

    for d in docs:  # every workload: probes, requests, non-root
        if d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for container in spec["containers"]:
                assert container["readinessProbe"] and container["livenessProbe"]
                assert container["resources"]["requests"]


def test_kubernetes_sidecar() -> None:
    docs = k8s_docs("sidecar")
    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    (gw,) = [c for c in pod["initContainers"] if c["name"] == "dashscope-proxy"]
    assert gw["restartPolicy"] == "Always"  # a native sidecar: starts first, stops last
    config = config_from(docs, gw, pod)
    check_gateway_container(gw, pod, config)
    assert gw["startupProbe"]["httpGet"]["path"] == "/readyz"  # the app starts once it is ready
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_grace_seconds

    (app,) = pod["containers"]
    env = {e["name"]: e for e in app["env"]}
    assert (
        env["DASHSCOPE_HTTP_BASE_URL"]["value"] == f"http://localhost:{config.server.port}/api/v1"
    )
    assert env["OPENAI_BASE_URL"]["value"] == f"http://localhost:{config.server.port}/v1"
    # The app holds its gateway key; the DashScope key is only in the sidecar.
    app_secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in app["env"] if "valueFrom" in e}
    gw_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in gw["env"]}
    assert gw_env["DASHSCOPE_API_KEY"] not in app_secrets
    assert gw_env["APP_GATEWAY_KEY"] in app_secrets

    monitor = one(docs, "PodMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], labels)
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in gw["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("variant", ["standalone", "sidecar"])
def test_port_names_fit_kubernetes_limits(variant: str) -> None:
    for d in k8s_docs(variant):
        if d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                for p in c.get("ports", []):
                    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", p["name"])
