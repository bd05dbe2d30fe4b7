"""The layout stays true: import-linter's contracts hold (and would catch a wrong import), every module has
a row in docs/architecture.md, every contract's room is in its layer table, and modules import no cycle."""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_vattr"
DOC = (REPO / "docs" / "architecture.md").read_text()
CONTRACTS = REPO / ".importlinter"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(path: Path) -> set[str]:
    """``hf_vattr`` modules one source file imports, relative or absolute, lazy ones included."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "hf_vattr":
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hf_vattr."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in _imports_of(path) if t in modules and t != name} for name, path in modules.items()}


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(CONTRACTS), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    res = _lint(REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_import_contracts_catch_an_upward_import(tmp_path):
    """The check can fail: a copy of the package where viz imports the streamer breaks the stage layers."""
    pytest.importorskip("importlinter")
    copy = tmp_path / "hf_vattr"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    overlays = copy / "viz" / "overlays.py"
    overlays.write_text(overlays.read_text() + "\n\ndef _wrong():\n    from ..streaming import streamer  # noqa: F401\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "hf_vattr.viz.overlays -> hf_vattr.streaming.streamer" in res.stdout, res.stdout[-3000:]


def test_every_module_has_a_row_in_the_architecture_doc():
    rows = set(re.findall(r"`([\w/]+\.py)`", DOC))
    missing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" and str(p.relative_to(PACKAGE)) not in rows)
    assert not missing, f"add {missing} to the module table of docs/architecture.md"


def test_every_room_of_the_contracts_is_in_the_layer_table():
    config = configparser.ConfigParser()
    config.read(CONTRACTS)
    layers = config["importlinter:contract:stages"]["layers"].strip().splitlines()
    table = re.findall(r"^\| (\d+) \| (.+?) \|", DOC, flags=re.M)
    assert len(table) == len(layers), "the layer table and the stages contract have different depths"
    for (number, cell), line in zip(table, layers):
        doc_rooms = set(re.findall(r"`(\w+)`", cell))
        contract_rooms = {r.strip().removeprefix("hf_vattr.") for r in line.split("|")}
        assert doc_rooms == contract_rooms, f"layer {number}: doc {sorted(doc_rooms)} != contract {sorted(contract_rooms)}"


def test_no_import_cycles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep in ("hf_vattr", module.rsplit(".", 1)[0]):
                continue  # a module may read its own package's re-exports
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
