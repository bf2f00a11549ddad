"""The import graph keeps its layers: cli → flows → demo → mc → gsp, never upward, no circles,
nothing loaded by a string (README, Development)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Each package and the project packages it may import (besides itself).
ALLOWED = {
    "gsp": set(),
    "mc": {"gsp"},
    "demo": {"mc", "gsp"},
    "flows": {"demo", "mc", "gsp"},
    "cli": {"flows", "demo", "mc", "gsp"},
}
#: What mc may use of gsp: the artifact contract and shared plumbing, not the generation side.
MC_MAY_USE = {"gsp.schema", "gsp.atomic", "gsp.errors", "gsp.embedding"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, module: str) -> set[str]:
    """Every project module this file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ALLOWED}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {r for name in imports_of(p, m) if (r := resolve(name, modules)) and r != m}
            for m, p in modules.items()}


def test_no_import_runs_up_a_layer():
    wrong = []
    for module, targets in graph().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{module} imports {target}")
            if package == "mc" and other == "gsp" and not any(
                    target == m or target.startswith(m + ".") for m in MC_MAY_USE):
                wrong.append(f"{module} imports {target} (mc uses gsp only for the artifact contract)")
    assert not wrong, wrong


def test_no_import_circles():
    graphlib.TopologicalSorter(graph()).prepare()  # raises CycleError naming the circle


def test_nothing_is_loaded_by_a_string():
    """No project module is imported through importlib or __import__ by name (third-party model
    packages, such as the offline embedding model's, may be)."""
    offenders = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
                    "import_module", "__import__"}:
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if any(n.split(".")[0] in ALLOWED for n in names) or (not names and module != "gsp.embedding"):
                    offenders.append(f"{module}:{node.lineno}")
    assert not offenders, offenders


def test_libraries_never_read_global_settings():
    readers = [m for m, p in project_modules().items()
               if m.split(".")[0] in {"gsp", "mc", "demo"} and m != "gsp.settings"
               and "get_settings(" in p.read_text(encoding="utf-8")]
    assert not readers, readers
