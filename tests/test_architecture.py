"""docs/architecture.md stays true: every module is in its table, imports only what its row allows,
and the package has no import cycle (lazy imports inside functions count)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_vattr"


def _imports_of(path: Path) -> set[str]:
    """Top-level ``hf_vattr`` modules that one source file imports (relative or absolute)."""
    pkg = list(path.relative_to(PACKAGE).parts[:-1])  # e.g. ["regions"] for regions/ward.py
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
            found.update(base[:1] if base else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_vattr":
            parts = node.module.split(".")[1:]
            found.update(parts[:1] if parts else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hf_vattr."))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if module != "__init__":
            graph.setdefault(module, set()).update(_imports_of(path) - {module})
    return graph


def _table() -> dict[str, tuple[frozenset[str], str]]:
    """module -> (modules of its row, the row's imports cell), from the first table of the doc."""
    return _rows()[0]


def _importable_by_all() -> set[str]:
    """Modules whose row says that every module may import them (the error base class)."""
    return _rows()[1]


def _rows() -> tuple[dict[str, tuple[frozenset[str], str]], set[str]]:
    rows: dict[str, tuple[frozenset[str], str]] = {}
    everywhere: set[str] = set()
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        if rows and cells[1].startswith("`scripts/"):
            break  # the second table (outside the package)
        names = frozenset(re.sub(r"\.py$|/$", "", n) for n in re.findall(r"`([^`]+)`", cells[1]))
        for name in names:
            rows[name] = (names, cells[3])
        if "every module may import it" in cells[2]:
            everywhere |= names
    return rows, everywhere


def test_every_module_is_in_the_architecture_table():
    missing = sorted(set(_graph()) - set(_table()))
    assert not missing, f"add {missing} to docs/architecture.md (what it owns, what it may import)"


def test_imports_follow_the_architecture_table():
    table, graph = _table(), _graph()
    wrong = []
    for module, deps in sorted(graph.items()):
        group, cell = table.get(module, (frozenset(), "-"))
        if cell.startswith("anything"):
            continue
        allowed = set(re.findall(r"`([^`]+)`", cell)) | group | _importable_by_all()
        wrong += [f"{module} -> {d}" for d in sorted(deps - allowed)]
    assert not wrong, f"imports not allowed by docs/architecture.md: {wrong}"
    importers_of = {m: sorted(k for k, deps in graph.items() if m in deps) for m in ("cli", "demo")}
    assert importers_of["cli"] == [], importers_of
    assert set(importers_of["demo"]) <= {"cli"}, importers_of


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
