"""The shape of the code, kept true: imports run one way, front ends stand side by side,
modules stay small, and docs/architecture.md names every module.

The import graph is read from the source (`ast`, module-level and function-level imports
alike), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"
MAX_LINES = 400

# The rooms, bottom to top: a module may import only from its own room or below.
LAYERS = {
    "base": 0,  # jsonutil, errors, metrics, catalogue, metering, auth, config
    "state": 1,
    "upstream": 2,
    "runtime": 2,  # the app's keys and per-request context: shared by upstream and above
    "storage": 2.5,  # durable images: fetches through upstream, used by core and fronts
    "core": 3,
    "fronts": 4,
    "ops": 5,
    "app": 6,
    "entry": 7,  # __main__, ops.server, ops.supervisor, ops.demo: they run the app
}
ENTRY = {"proxy.__main__", "proxy.ops.server", "proxy.ops.supervisor", "proxy.ops.demo"}
BASE = {"jsonutil", "errors", "metrics", "catalogue", "metering", "auth", "config", "__init__"}


def gateway_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PROXY.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if "simulator" in rel.parts:
            continue
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the gateway uses absolute ones)")
    return {m for m in found if m in known}


MODULES = gateway_modules()
GRAPH = {m: imports_of(p, set(MODULES)) - {m} for m, p in MODULES.items()}


def layer(module: str) -> float:
    if module in ENTRY:
        return LAYERS["entry"]
    top = module.split(".")[1] if "." in module else "__init__"
    if top in BASE:
        return LAYERS["base"]
    return LAYERS[top]


def test_the_graph_is_read() -> None:
    # A broken reader would make every other test here pass vacuously.
    assert "proxy.core.settlement" in GRAPH["proxy.fronts.native"]
    assert len(MODULES) > 40


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_imports_run_one_way() -> None:
    upward = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps if layer(b) > layer(a)]
    assert upward == []


def test_front_ends_never_import_each_other() -> None:
    def front(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "fronts" else None

    sideways = [
        f"{a} -> {b}"
        for a, deps in GRAPH.items()
        for b in deps
        if front(a) and front(b) and front(a) != front(b)
    ]
    assert sideways == []


def test_the_simulator_imports_nothing_of_the_gateway() -> None:
    for path in (PROXY / "simulator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("proxy.") or node.module.startswith(
                    "proxy.simulator"
                ), f"{path}: imports {node.module}"


@pytest.mark.parametrize(
    "path", sorted(PROXY.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_architecture_page_names_every_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(ROOT))
        for name, path in MODULES.items()
        if path.name != "__init__.py" and f"({'../' + str(path.relative_to(ROOT))})" not in page
    ]
    assert missing == [], "docs/architecture.md does not link these modules"
