"""The package layering of docs/design.md §1, read from the import statements of every module: ``layers/`` imports
neither ``data/``, ``lightning_modules/`` nor Lightning; ``data/`` does not import ``lightning_modules/``; every
import of a project module names one that exists; the project's modules import one another without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("layers", "data", "lightning_modules")
#: package -> the top-level modules it must not import
FORBIDDEN = {
    "layers": ("data", "lightning_modules", "lightning", "pytorch_lightning"),
    "data": ("lightning_modules",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, modules_only: bool = False) -> set[str]:
    """Absolute names that ``path`` imports (relative imports resolved), at any depth: the modules and, unless
    ``modules_only``, ``module.name`` for each name of a ``from module import name``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            if not modules_only:
                out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(package):
    bad = []
    for name, path in _modules().items():
        if name.split(".")[0] != package:
            continue
        for imported in _imports(path):
            if imported.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(bad)


def test_every_project_import_names_an_existing_module():
    """A relative import left behind by a move (``from .learngn import ...`` in a module that left
    ``lightning_modules/``) fails here, before anything runs it."""
    modules = _modules()
    bad = [f"{name} imports {imported}, which does not exist" for name, path in modules.items()
           for imported in _imports(path, modules_only=True)
           if imported.split(".")[0] in PACKAGES and imported not in modules]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_project_modules():
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle of the design
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
