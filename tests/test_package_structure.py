"""The package's shape: no import cycles, a core that never imports the Keras integration,
and a core that works in a process where Keras cannot be imported at all."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "shardimpl"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(pkg: pathlib.Path = PKG) -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in pkg.rglob("*.py")}


def import_graph(pkg: pathlib.Path = PKG) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports, at top level or inside functions."""
    modules = _modules(pkg)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph):
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_among_shardimpl_modules_lazy_imports_included():
    graph = import_graph()
    assert "shardimpl.keras.patches" in graph and graph["shardimpl.keras.patches"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycles_among_bench_modules_lazy_imports_included():
    graph = import_graph(ROOT / "bench")
    assert "bench.report.plots" in graph and "bench.harness.scenarios" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_bench_layers_the_harness_and_the_report_depend_on_nothing_above_them():
    """The harness (what is run) imports only the harness; the report (what is shown) reads rows
    and imports only the report; gates, tools and suites sit above both."""
    graph = import_graph(ROOT / "bench")
    for layer in ("bench.harness", "bench.report"):
        members = [m for m in graph if m.startswith(layer + ".")]
        assert members, layer
        outside = {m: sorted(t for t in graph[m] if not t.startswith(layer)) for m in members}
        assert {m: t for m, t in outside.items() if t} == {}, layer


def _private_shardimpl_uses(tree) -> list[str]:
    """Private shardimpl names a module reaches: imported, or read off an imported shardimpl module."""
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shardimpl"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("shardimpl")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_bench_uses_only_public_names_of_shardimpl():
    """The harness measures what a user can call: no private shardimpl module or name."""
    offenders = [f"{name}: {use}" for name, path in _modules(ROOT / "bench").items()
                 for use in _private_shardimpl_uses(ast.parse(path.read_text()))]
    assert offenders == []


def test_the_private_name_check_sees_imports_and_attribute_reads():
    tree = ast.parse("from shardimpl import launch\nfrom shardimpl.x import _y\nlaunch._in_torchrun()\nlaunch.run()\n")
    assert _private_shardimpl_uses(tree) == ["from shardimpl.x import _y", "launch._in_torchrun"]


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_the_core_never_imports_the_keras_integration():
    graph = import_graph()
    core = [m for m in graph if not m.startswith("shardimpl.keras") and m != "shardimpl"]
    assert "shardimpl.create" in core and "shardimpl.gather" in core
    offenders = {m: sorted(t for t in graph[m] if t.startswith("shardimpl.keras")) for m in core}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_core_modules_import_keras_only_inside_functions():
    for name, path in _modules().items():
        if name.startswith("shardimpl.keras"):
            continue
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "keras" for a in node.names), name
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "keras", name


@pytest.mark.distributed
def test_the_core_works_on_two_ranks_where_keras_cannot_be_imported(tmp_path):
    blocker = tmp_path / "blocked" / "keras"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('keras is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), str(ROOT), str(ROOT / "tests")])}
    env.pop("KERAS_BACKEND", None)
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_torch_only_world.py")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    for rank, row in enumerate(rows):
        v = row["value"]
        assert v["keras_importable"] is False
        assert v["gathered_equal"] and v["checkpoint_equal"]
        assert abs(v["drawn_std"] - 0.02) < 0.002
        assert v["callable_sum"] == 9.0
        assert v["local_rows"] == ([4, 5] if rank == 0 else [3, 5])
        assert "Keras is not importable here" in v["keras_name_error"]
