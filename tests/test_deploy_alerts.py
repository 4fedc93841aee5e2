"""The Prometheus alert rules (deploy/prometheus/alerts.yml), parsed and checked without
Prometheus: the structure Prometheus requires, balanced expressions, and every metric and
label an expression or annotation uses is one the gateway exports (or one of the few being
added). Compose loads the file; the Kubernetes PrometheusRule carries the same groups.
`promtool check rules` runs too where promtool is installed (CI has only PyPI: skipped)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULE = REPO / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"

# Metrics other changes are adding to the gateway; rules may use them before they land.
BEING_ADDED = {
    "dashscope_proxy_storage_errors_total",
}
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus attaches from the target (static config, ServiceMonitor, PodMonitor).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}

RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
IDENT = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
LABEL_REF = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def exported() -> dict[str, set[str]]:
    """Every series name the gateway exports -> its label names, from the real registry."""
    out: dict[str, set[str]] = {}
    for m in vars(Metrics(CollectorRegistry())).values():
        m = getattr(m, "counter", m)  # BoundedCodes wraps a Counter
        labels = set(m._labelnames) if hasattr(m, "_labelnames") else set()
        if isinstance(m, Counter):
            out[m._name + "_total"] = labels
        elif isinstance(m, Histogram):
            out[m._name + "_bucket"] = labels | {"le"}
            out[m._name + "_sum"] = out[m._name + "_count"] = labels
        elif isinstance(m, Gauge):
            out[m._name] = labels
    return out


def groups() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert set(data) == {"groups"}, set(data)
    result: list[dict[str, Any]] = data["groups"]
    return result


def rules() -> list[dict[str, Any]]:
    return [r for g in groups() for r in g["rules"]]


def balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def selectors(expr: str) -> list[tuple[str | None, set[str]]]:
    """(metric name or None, label names matched) of every `name{...}` selector."""
    out = []
    for m in SELECTOR.finditer(STRING.sub('""', expr)):
        labels = {part.split("=")[0].split("!")[0].strip() for part in m.group(2).split(",")}
        out.append((m.group(1), {label for label in labels if label}))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels, durations out)."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = set()
    for m in IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def kept_labels(expr: str, known: dict[str, set[str]]) -> set[str]:
    """Labels an alert from `expr` can carry: what every `by` list keeps if it aggregates,
    else the target's labels and the exported metrics' own, less any `without` list."""
    clauses = [
        (m.group(1), {s.strip() for s in m.group(2).split(",") if s.strip()})
        for m in GROUPING.finditer(STRING.sub('""', expr))
    ]
    by = [labels for kind, labels in clauses if kind == "by"]
    if by:
        return set.intersection(*by)
    kept = set(TARGET_LABELS)
    for name in metric_names(expr):
        kept |= known.get(name, set())
    for kind, labels in clauses:
        if kind == "without":
            kept -= labels
    return kept


# ------------------------------------------------------------------------ the checkers bite


def test_the_expression_checks_find_what_they_look_for() -> None:
    expr = (
        'sum by (job, upstream) (rate(dashscope_proxy_upstream_errors_total{code=~"a|b"}[5m]))'
        " / on (job) group_left up > 0 and bool offset_thing"
    )
    assert metric_names(expr) == {"dashscope_proxy_upstream_errors_total", "up", "offset_thing"}
    assert metric_names("predict_linear(x[1h], 4 * 3600) < 0") == {"x"}
    assert metric_names('max without (upstream) (y{a="(", b!~"}"}) == 0') == {"y"}
    assert selectors('x{code=~"5..", route!="a,b"}') == [("x", {"code", "route"})]
    assert balanced('sum(rate(x{a="("}[5m]))')
    assert not balanced("sum(rate(x[5m])")
    assert not balanced("sum(rate(x[5m)])")
    known = {"x": {"upstream", "code"}}
    assert kept_labels("sum by (job, key) (x) > 0", known) == {"job", "key"}
    assert "upstream" in kept_labels("x == 0", known)
    assert "upstream" not in kept_labels("max without (upstream) (x) == 0", known)
    assert set(exported()) >= {"dashscope_proxy_requests_total", "dashscope_proxy_upstream_up"}
    assert "code" in exported()["dashscope_proxy_requests_total"]


# ------------------------------------------------------------------------ alerts.yml


def test_alert_rules_have_the_structure_prometheus_requires() -> None:
    names = [g["name"] for g in groups()]
    assert names and all(isinstance(n, str) and n for n in names)
    assert len(names) == len(set(names))
    alerts = []
    for group in groups():
        assert set(group) <= {"name", "interval", "limit", "rules"}, set(group)
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS and "record" not in rule, set(rule)
            name = rule["alert"]
            alerts.append(name)
            assert re.fullmatch(r"DashscopeProxy[A-Z][A-Za-z0-9]+", name), name
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
            assert isinstance(rule["for"], str) and rule["for"], name
            assert DURATION.fullmatch(rule["for"]), (name, rule["for"])
            assert rule["labels"]["severity"] in SEVERITIES, name
            for key in ("summary", "description", "runbook"):
                text = rule["annotations"][key]
                assert isinstance(text, str) and len(text.strip()) > 10, (name, key)
                assert text.count("{{") == text.count("}}"), (name, key)
    assert len(alerts) == len(set(alerts)), "alert names must be unique"


def test_alert_expressions_are_balanced_and_use_only_exported_metrics() -> None:
    known = exported()
    allowed = set(known) | BEING_ADDED | PROMETHEUS_SERIES
    for rule in rules():
        expr = rule["expr"]
        assert balanced(expr), (rule["alert"], expr)
        assert expr.count('"') % 2 == 0, rule["alert"]
        used = metric_names(expr)
        assert used, (rule["alert"], expr)
        unknown = used - allowed
        assert not unknown, f"{rule['alert']}: metrics the gateway does not export: {unknown}"
        for metric, labels in selectors(expr):
            if metric in known:
                missing = labels - known[metric] - TARGET_LABELS
                assert not missing, f"{rule['alert']}: {metric} has no label {missing}"


def test_annotations_only_name_labels_the_alert_carries() -> None:
    known = exported()
    for rule in rules():
        kept = kept_labels(rule["expr"], known)
        for key, text in rule["annotations"].items():
            for label in LABEL_REF.findall(text):
                assert label in kept, (rule["alert"], key, label, sorted(kept))


def test_alert_rules_cover_the_operator_questions() -> None:
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            by_metric.setdefault(name, []).append(rule)

    def uses(metric: str) -> list[str]:
        assert metric in by_metric, f"no rule uses {metric}"
        return [r["expr"] for r in by_metric[metric]]

    assert any("== 0" in e for e in uses("dashscope_proxy_config_last_reload_successful"))
    assert any("== 0" in e for e in uses("dashscope_proxy_upstream_up"))
    assert any('code=~"5.."' in e and "/" in e for e in uses("dashscope_proxy_requests_total"))
    # A 401 upstream does not open the breaker: the error counter by DashScope code shows it.
    assert any("InvalidApiKey" in e for e in uses("dashscope_proxy_upstream_errors_total"))
    assert any("rate(" in e for e in uses("dashscope_proxy_storage_errors_total"))
    assert any("increase(" in e for e in uses("dashscope_proxy_unmetered_answers_total"))
    assert uses("dashscope_proxy_metering_anomalies_total")
    assert uses("dashscope_proxy_quota_remaining_images")
    severities = {r["labels"]["severity"] for r in rules()}
    assert {"critical", "warning"} <= severities


def test_compose_prometheus_loads_the_rules() -> None:
    prom = yaml.safe_load(PROMETHEUS.read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {}
    for volume in compose["services"]["prometheus"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = (REPO / source).resolve()
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS.resolve()
    loaded = [mounts[path] for path in prom["rule_files"]]
    assert ALERTS.resolve() in loaded


def test_kubernetes_prometheusrule_holds_the_same_groups() -> None:
    rule = yaml.safe_load(RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == groups(), "copy deploy/prometheus/alerts.yml's groups"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
