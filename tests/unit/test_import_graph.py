"""No import cycle among our own modules, and every gateway module imports on its own.

The graph is read from the source with `ast`, not from `sys.modules`: every `import` and
`from ... import` counts, at module level and inside functions alike (a late import only hides
a cycle from the interpreter, not from a reader), with relative imports resolved. An edge goes
from a module to each of our modules it names; `from package import name` names the submodule
`package.name` when there is one, else the package. Cycles are the strongly connected
components of more than one module (Tarjan). Generated code (services/common/pb) is left out:
it imports only itself and the protobuf runtime.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "services", "imgpipe")
GENERATED = ("services.common.pb",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    """Every module of PACKAGES, by dotted name (generated code left out)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            if not name.startswith(GENERATED):
                found[name] = path
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The dotted name `from <node.module>` means inside `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    # `from . import x` in a package's __init__ is the package itself; in a module, its parent.
    keep = len(base) - node.level + (1 if is_package else 0)
    prefix = ".".join(base[:keep])
    return f"{prefix}.{node.module}" if node.module else prefix


def _own(name: str, modules: Mapping[str, Path]) -> str | None:
    """`name`, or its nearest enclosing package, if it is one of ours (generated code is not)."""
    if name.startswith(GENERATED):
        return None
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """Our modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                named.add(submodule if submodule in modules else source)
    return {own for own in (_own(name, modules) for name in named) if own and own != module}


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        # Recursive: a chain of imports is as deep as our modules are many, a few hundred.
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(component: list[str], graph: Mapping[str, Iterable[str]]) -> str:
    """The component, and the imports inside it."""
    members = set(component)
    edges = [
        f"    {source} -> {target}"
        for source in component
        for target in sorted(graph[source])
        if target in members
    ]
    return " <-> ".join(component) + "\n" + "\n".join(edges)


GRAPH = import_graph(our_modules())


def cycles_in(prefix: str) -> list[list[str]]:
    return [
        component
        for component in cycles(GRAPH)
        if any(member == prefix or member.startswith(prefix + ".") for member in component)
    ]


def test_cycles_are_found() -> None:
    """The detector itself: it must see a cycle, a self-contained chain is none."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_late_and_relative_imports_count(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import one\n")
    (package / "one.py").write_text("def f() -> None:\n    from .two import g\n")
    (package / "two.py").write_text("from pkg import one\n")
    modules = {"pkg": package / "__init__.py", "pkg.one": package / "one.py"}
    modules["pkg.two"] = package / "two.py"
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": {"pkg.one"}, "pkg.one": {"pkg.two"}, "pkg.two": {"pkg.one"}}
    assert cycles(graph) == [["pkg.one", "pkg.two"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package: str) -> None:
    found = cycles_in(package)
    assert not found, "import cycles:\n" + "\n".join(describe(c, GRAPH) for c in found)


GATEWAY_MODULES = sorted(name for name in GRAPH if name.startswith("gateway."))


@pytest.mark.parametrize("module", GATEWAY_MODULES)
def test_each_gateway_module_imports_on_its_own(module: str) -> None:
    """In a fresh interpreter, so no other module has been imported before it."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
