"""The package's layout keeps its promises: the core never imports Lightning, its sub-packages import only those
below them, no modules import each other in a circle (``TYPE_CHECKING`` imports included), no file is long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lora"
# The core's sub-packages from the bottom up: each may import itself and those before it.
CORE_ORDER = (
    "common", "config", "layers", "targets", "quantization", "inits", "kinds", "surgery", "training", "files",
    "composition",
)
MAX_LINES = 410


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every lightning_lora module (or package) ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _core_level(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["lightning_lora", "core"] or len(parts) < 3 or parts[2] not in CORE_ORDER:
        return None
    return CORE_ORDER.index(parts[2])


def test_the_core_never_imports_lightning() -> None:
    offenders = {
        name: sorted(m for m in _imports(path) if m.split(".")[0] in ("lightning", "pytorch_lightning")
                     or m.startswith("lightning_lora.lightning"))
        for name, path in MODULES.items() if name.startswith("lightning_lora.core")
    }  # fmt: skip
    assert {name: found for name, found in offenders.items() if found} == {}


def test_core_sub_packages_import_only_those_below_them() -> None:
    upward = [
        f"{name} -> {imported}"
        for name, imported_modules in _graph().items()
        if (level := _core_level(name)) is not None
        for imported in imported_modules
        if (target := _core_level(imported)) is not None and target > level
    ]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    edges = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_is_long(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_generic_code_calls_only_what_the_kind_protocol_declares() -> None:
    """Every ``<...>.kind.<member>`` (and ``kind_of(config).<member>``) outside ``kinds/`` is declared on
    ``AdapterKind``; generic code never compares a kind's name with a literal."""
    from lightning_lora.core.kinds.base import AdapterKind

    undeclared, by_name = set(), []
    for name, path in MODULES.items():
        if name.startswith("lightning_lora.core.kinds"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _is_kind(node.value) and not hasattr(AdapterKind, node.attr):
                if node.attr not in AdapterKind.__annotations__:
                    undeclared.add(f"{name}: kind.{node.attr}")
            if isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Attribute) and side.attr == "name" and _is_kind(side.value)
                for side in (node.left, *node.comparators)
            ) and any(isinstance(side, ast.Constant) for side in (node.left, *node.comparators)):
                by_name.append(f"{name}:{node.lineno}")
    assert (sorted(undeclared), by_name) == ([], [])


def _is_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "kind"
    if isinstance(node, ast.Name):
        return node.id == "kind"
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "kind_of"
