"""The import graph: the shared core (every module of the package outside deploytool.stages, except the modules whose
job is to call the stages: the CLI, its commands, the pipeline and its wiring) never imports a stage, and module-level
imports form no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deploytool"
WIRING = {"cli", "commands", "console", "options", "pipeline", "wiring", "__main__"}  # the modules whose job is to call the stages


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The deploytool modules `path` imports (anywhere in it, or only at module level)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deploytool"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deploytool") and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
    return found


CORE = sorted(p for p in PACKAGE.glob("*.py") if p.stem not in WIRING)


def test_no_core_module_imports_a_stage_even_inside_a_function() -> None:
    offenders = {_module(p): sorted(m for m in _imports(p, False) if m.startswith("deploytool.stages")) for p in CORE}
    offending = {k: v for k, v in offenders.items() if v}
    assert not offending, offending


def test_each_core_module_imports_alone_without_the_stages() -> None:
    names = [_module(p) for p in CORE]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    loaded = sorted(m for m in sys.modules if m.startswith('deploytool.stages'))\n"
            "    assert not loaded, (name, loaded)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_module_level_imports_form_no_cycle() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    graph = {_module(p): {m for m in _imports(p, True) if m != _module(p)} for p in paths}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target):], target]))
            if target in graph and state.get(target) is None:
                visit(target, [*path, target])
        state[node] = 2

    for module in graph:
        if state.get(module) is None:
            visit(module, [module])
