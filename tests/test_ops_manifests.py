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
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from proxy.config import Config, ServerConfig, parse_config
from proxy.metrics import Metrics

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


def kustomization(variant: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / variant / "kustomization.yaml").read_text())
    return data


def k8s_docs(variant: str) -> list[dict[str, Any]]:
    """Every object a kustomization applies, following directory resources (bases)."""
    docs: list[dict[str, Any]] = []
    for resource in kustomization(variant)["resources"]:
        path = K8S / variant / resource
        assert path.exists(), resource
        if path.is_dir():
            docs += k8s_docs(str(path.relative_to(K8S)))
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], d
    return docs


def example_secrets() -> dict[str, dict[str, str]]:
    """secret.example.yaml: Secret name -> its (placeholder) stringData."""
    text = (K8S / "standalone/secret.example.yaml").read_text()
    return {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all(text) if d}


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
    scrape = config.server.final_scrape_seconds if config.server.metrics_port else 0
    assert (
        pod["terminationGracePeriodSeconds"]
        >= sleep + config.server.shutdown_grace_seconds + scrape + 5
    )
    # Replicas share state through Redis, and the URL points at a Service that exists.
    # The HPA sets the count: the most it may run is what has to share.
    hpa = one(docs, "HorizontalPodAutoscaler")
    if max(deploy["spec"].get("replicas", 1), hpa["spec"]["maxReplicas"]) > 1:
        assert config.state.backend == "redis"
        host = urlsplit(config.state.url or "").hostname
        assert host and one(docs, "Service", host)

    # Every Secret the pod reads is one documented in secret.example.yaml.
    examples = example_secrets()
    for e in c["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["key"] in examples[ref["name"]], ref

    svc = one(docs, "Service", "dashscope-proxy")
    assert selects(svc["spec"]["selector"], labels)
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    for port in ports.values():
        assert port["targetPort"] in named
    # /metrics is scraped on the metrics listener, which outlives the drain.
    assert config.server.metrics_port == named[ports["metrics"]["targetPort"]]
    assert config.server.port == named[ports["http"]["targetPort"]]
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
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


# ------------------------------------------------------------------------ Kubernetes hardening

GATEWAY = "standalone"


def pod_labels(deploy: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deploy["spec"]["template"]["metadata"]["labels"]
    return labels


def container_ports(deploy: dict[str, Any]) -> dict[str, int]:
    spec = deploy["spec"]["template"]["spec"]
    return {
        p["name"]: p["containerPort"]
        for c in spec.get("initContainers", []) + spec["containers"]
        for p in c.get("ports", [])
    }


def policy_ports(rule: dict[str, Any], deploy: dict[str, Any]) -> set[tuple[str, int]]:
    """(protocol, number) of an ingress rule's ports; named ports resolved in the pod."""
    named = container_ports(deploy)
    out = set()
    for port in rule["ports"]:
        number = port["port"] if isinstance(port["port"], int) else named[port["port"]]
        out.add((port.get("protocol", "TCP"), number))
    return out


def redis_and_gateway(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return one(docs, "Deployment", "dashscope-proxy-redis"), one(
        docs, "Deployment", "dashscope-proxy"
    )


@pytest.mark.parametrize("variant", ["standalone", "sidecar", "monitoring"])
def test_kustomization_lists_every_manifest_in_its_folder(variant: str) -> None:
    folder = K8S / variant
    listed = kustomization(variant)["resources"]
    files = {r for r in listed if (folder / r).is_file()}
    for r in set(listed) - files:  # bases: directories with a kustomization of their own
        assert (folder / r / "kustomization.yaml").is_file(), r
    on_disk = {
        p.name
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml")
        and p.name != "kustomization.yaml"
        and not p.name.endswith((".example.yaml", ".example.yml"))  # shapes, never applied
    }
    assert files == on_disk, (sorted(on_disk - files), sorted(files - on_disk))
    assert len(listed) == len(set(listed))


def test_redis_requires_the_password_the_gateway_uses_both_from_a_secret() -> None:
    docs = k8s_docs(GATEWAY)
    redis, gateway = redis_and_gateway(docs)
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    args = rc["args"]
    expansion = re.fullmatch(r"\$\(([A-Z_][A-Z0-9_]*)\)", args[args.index("--requirepass") + 1])
    assert expansion, "requirepass must be $(VAR), expanded by Kubernetes from the env"
    redis_env = {e["name"]: e for e in rc["env"]}
    redis_ref = redis_env[expansion.group(1)]["valueFrom"]["secretKeyRef"]

    (gc,) = gateway["spec"]["template"]["spec"]["containers"]
    # The config names the password only as ${VAR}: the ConfigMap holds no secret.
    raw = yaml.safe_load(one(docs, "ConfigMap", "dashscope-proxy-config")["data"]["config.yaml"])
    # `state.password` (any characters, not URL syntax), and no password in the URL.
    url = urlsplit(raw["state"]["url"])
    assert url.password is None, raw["state"]["url"]
    var = _VAR.fullmatch(raw["state"]["password"])
    assert var, raw["state"]["password"]
    gateway_env = {e["name"]: e for e in gc["env"]}
    gateway_ref = gateway_env[var.group(1)]["valueFrom"]["secretKeyRef"]
    assert (gateway_ref["name"], gateway_ref["key"]) == (redis_ref["name"], redis_ref["key"])
    assert url.hostname == "dashscope-proxy-redis" and url.port == 6379

    # ... and that Secret's shape is documented, with a placeholder only.
    assert redis_ref["key"] in example_secrets()[redis_ref["name"]]
    # The gateway reads the password with the Secret's value substituted.
    config = config_from(docs, gc, gateway["spec"]["template"]["spec"])
    assert config.state.password == f"placeholder-value-of-{var.group(1)}"


def test_network_policy_admits_only_the_gateway_to_redis() -> None:
    docs = k8s_docs(GATEWAY)
    redis, gateway = redis_and_gateway(docs)
    redis_labels, gateway_labels = pod_labels(redis), pod_labels(gateway)
    assert not selects(redis_labels, gateway_labels) and not selects(gateway_labels, redis_labels)
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and selects(d["spec"]["podSelector"].get("matchLabels", {}), redis_labels)
    ]
    assert policies, "no NetworkPolicy selects the Redis pods"
    for policy in policies:  # policies add up: every one that selects Redis must be this narrow
        spec = policy["spec"]
        assert "Ingress" in spec["policyTypes"]
        for rule in spec.get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"only pods of this namespace: {peer}"
                selector = peer["podSelector"]
                assert set(selector) == {"matchLabels"} and selector["matchLabels"], selector
                assert selects(selector["matchLabels"], gateway_labels)
                assert not selects(selector["matchLabels"], redis_labels)
            assert policy_ports(rule, redis) == {("TCP", 6379)}
    assert any(p["spec"].get("ingress") for p in policies)


def test_network_policy_for_the_gateway_admits_clients_and_prometheus_on_its_port() -> None:
    docs = k8s_docs(GATEWAY)
    redis, gateway = redis_and_gateway(docs)
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and selects(d["spec"]["podSelector"]["matchLabels"], pod_labels(gateway))
    ]
    assert not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(redis))
    api, metrics = ServerConfig().port, container_ports(gateway)["metrics"]
    peers = []
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every source"
        ports = policy_ports(rule, gateway)
        monitoring = any(
            p.get("namespaceSelector", {}).get("matchLabels")
            == {"kubernetes.io/metadata.name": "monitoring"}
            for p in rule["from"]
        )
        # API clients reach the API port; Prometheus only the metrics listener.
        assert ports == ({("TCP", metrics)} if monitoring else {("TCP", api)}), rule
        peers += rule["from"]
    assert {"podSelector": {}} in peers  # every pod of the namespace
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in peers if "namespaceSelector" in p]
    assert {"kubernetes.io/metadata.name": "monitoring"} in namespaces  # Prometheus
    assert not any("ipBlock" in p for p in peers)


def test_gateway_replicas_spread_over_zones_and_nodes() -> None:
    gateway = one(k8s_docs(GATEWAY), "Deployment", "dashscope-proxy")
    constraints = gateway["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_key = {c["topologyKey"]: c for c in constraints}
    assert set(by_key) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in constraints:
        assert c["whenUnsatisfiable"] == "ScheduleAnyway"  # a preference, never Pending
        assert c["maxSkew"] == 1
        assert selects(c["labelSelector"]["matchLabels"], pod_labels(gateway))


def quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([KMG]i?)?", str(q))
    assert m, q
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


@pytest.mark.parametrize("variant", ["standalone", "sidecar"])
def test_every_emptydir_has_a_size_limit(variant: str) -> None:
    volumes = [
        v
        for d in k8s_docs(variant)
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "emptyDir" in v
    ]
    assert volumes
    for v in volumes:
        assert quantity_bytes(v["emptyDir"]["sizeLimit"]) >= 16 * 2**20, v["name"]
    # The gateway's state volume holds the SQLite file: room for more than a scratch dir.
    state = next(v for v in volumes if v["name"] in ("state", "proxy-state"))
    assert quantity_bytes(state["emptyDir"]["sizeLimit"]) >= 256 * 2**20


def test_hpa_scales_the_gateway_deployment_on_cpu() -> None:
    docs = k8s_docs(GATEWAY)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    deploy = one(docs, "Deployment", ref["name"])
    assert pod_labels(deploy).get("app.kubernetes.io/component") == "gateway"
    assert "replicas" not in deploy["spec"], "the HPA owns the count; a fixed one fights it"
    # Two at least: the PDB keeps one available, so a drain can move the other.
    pdb = one(docs, "PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["cpu"]  # Utilization is a share of the request


def test_hpa_comments_name_the_real_in_flight_gauge() -> None:
    # The commented Pods metric and the adapter rule must name a gauge the gateway exports.
    text = (K8S / GATEWAY / "hpa.yaml").read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    named = set(re.findall(r"\bdashscope_proxy_[a-z_]+\b", comments))
    metrics = Metrics(CollectorRegistry())
    gauges = {m._name for m in vars(metrics).values() if isinstance(m, Gauge)}
    assert named and named <= gauges, named - gauges
    assert metrics.inflight._name in named
    # Uncommented, the example is a valid Pods metric.
    block = re.search(r"^(\s*)# - type: Pods\n((?:\1#.*\n)+)", text, re.MULTILINE)
    assert block
    uncommented = "\n".join(
        line.split("# ", 1)[1] for line in ("# - type: Pods\n" + block.group(2)).splitlines()
    )
    (metric,) = yaml.safe_load(uncommented)
    assert metric["pods"]["metric"]["name"] == metrics.inflight._name
    assert metric["pods"]["target"]["type"] == "AverageValue"


@pytest.mark.parametrize("variant", ["standalone", "sidecar"])
def test_monitoring_objects_get_the_release_label(variant: str) -> None:
    # kube-prometheus-stack selects ServiceMonitors / PodMonitors / PrometheusRules by `release`.
    patches = [
        p
        for p in kustomization(variant).get("patches", [])
        if p.get("target", {}).get("group") == "monitoring.coreos.com"
    ]
    (patch,) = patches
    ops = yaml.safe_load(patch["patch"])
    (op,) = ops
    assert (op["op"], op["path"]) == ("add", "/metadata/labels/release") and op["value"]
    monitoring = [
        d for d in k8s_docs(variant) if d["apiVersion"].startswith("monitoring.coreos.com/")
    ]
    kinds = {d["kind"] for d in monitoring}
    assert kinds >= {"PrometheusRule"} and kinds & {"ServiceMonitor", "PodMonitor"}
    for d in monitoring:
        assert isinstance(d["metadata"].get("labels"), dict), d["kind"]  # `add` needs the map


# ------------------------------------------------------------------------ Compose demo URLs


def published(svc: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of a service's `ports` (short syntax)."""
    out = {}
    for entry in svc.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), entry  # HOST:CONTAINER or IP:HOST:CONTAINER
        out[int(parts[-1].split("/")[0])] = int(parts[-2])
    return out


def test_compose_simulator_image_urls_open_on_the_host() -> None:
    services = compose()["services"]
    cmd = services["simulator"]["command"]
    port = int(cmd[cmd.index("--port") + 1])
    public = urlsplit(cmd[cmd.index("--public-url") + 1])
    assert public.scheme == "http" and public.hostname in ("localhost", "127.0.0.1")
    assert public.hostname not in services  # a service name resolves only inside Compose
    assert public.path in ("", "/")
    assert published(services["simulator"]).get(port) == public.port, (
        "the URL's port must be the host port that publishes the simulator's"
    )
