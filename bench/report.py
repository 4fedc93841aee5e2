"""The results table (plain text, also valid Markdown) and the JSON document."""

from __future__ import annotations

from typing import Any

from .core import Metric, ScenarioResult
from .instructions import VARIANTS

# `proxied request` and `expected` are the reconciler row's same-run references;
# `idle interpreter` the usage row's (the report's RSS before it reads anything);
# `no key` the idempotency row's (the same gateway without an Idempotency-Key);
# `VARIANTS` the instructions rows' (the gateway with features off).
COLUMNS = (
    "direct",
    "reference",
    "nginx",
    "workers=1",
    "proxied request",
    "expected",
    "idle interpreter",
    "no key",
    *VARIANTS,
    "gateway",
)


def _num(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(m: Metric, target: str) -> str:
    s = m.summary(target)
    if s is None:
        return ""
    if s["runs"] == 1 or s["min"] == s["max"]:
        return _num(s["median"])
    return f"{_num(s['median'])} [{_num(s['min'])}..{_num(s['max'])}]"


def _ratio(m: Metric) -> str:
    j = m.to_json().get("ratio")
    if not j:
        return ""
    if j["min"] == j["max"]:
        return f"{j['median']:.2f}x"
    return f"{j['median']:.2f}x [{j['min']:.2f}..{j['max']:.2f}]"


def table(results: list[ScenarioResult]) -> str:
    used = [c for c in COLUMNS if any(c in m.values for r in results for m in r.metrics)]
    head = ["scenario", "metric", *used, "ratio", "target", "met"]
    rows: list[list[str]] = []
    for r in results:
        if r.skipped:
            rows.append([r.name, f"SKIPPED: {r.skipped}", *[""] * (len(head) - 2)])
            continue
        for m in r.metrics:
            met = m.to_json().get("met")
            unit = f" ({m.unit})" if m.unit else ""
            rows.append(
                [
                    r.name,
                    m.name + unit,
                    *[_cell(m, c) for c in used],
                    _ratio(m),
                    m.target,
                    "" if met is None else ("yes" if met else "NO"),
                ]
            )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    notes = [f"- {r.name}: {n}" for r in results for n in r.notes]
    return "\n".join(out + ([""] + notes if notes else []))


def document(results: list[ScenarioResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "scenarios": {r.name: r.to_json() for r in results}}
