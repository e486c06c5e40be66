"""The packages are layers: ``ledger`` < ``reports`` < ``slurm_plugin``, no import circles.

Every ``.py`` of the three packages is parsed (``ast``): ``import``/``from … import`` at any
depth (in functions too), ``importlib.import_module("…")`` with a literal name and
``"module:ATTR"`` strings (the CLI roots load commands so) are imports. A module may import
only from its own package or a lower one; the import graph has no cycle. Imports under
``if TYPE_CHECKING:`` never run: they count for the layers, not for cycles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ledger", "reports", "slurm_plugin")  # each may import only itself and those before
_ENTRY = re.compile("^(" + "|".join(LAYERS) + r")(\.\w+)*:\w+$")  # "module:ATTR"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` runs (its longest known prefix)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(module imported, line, runs at run time) for every import of module ``name``."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_lines(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # ``from pkg import mod`` imports pkg.mod
                found.append((f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod,
                              node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and _ENTRY.match(node.value):
            found.append((node.value.partition(":")[0], node.lineno))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") \
                and node.args and isinstance(node.args[0], ast.Constant):
            found.append((str(node.args[0].value), node.lineno))
    out = []
    for target, line in found:
        owner = _owner(target, known)
        if owner is not None and owner != name:
            out.append((owner, line, line not in typing_only))
    return out


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """(runtime import graph, layer violations as ``module:line -> module`` lines)."""
    known = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in known}
    upward = []
    for name, path in known.items():
        for target, line, runtime in imports(name, path, known):
            if LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0]):
                upward.append(f"{name}:{line} -> {target}")
            if runtime:
                edges[name].add(target)
    return edges, sorted(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # depth is the import chain's: far below the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_package_imports_from_a_higher_layer():
    _, upward = graph()
    assert upward == [], "imports from a higher layer (ledger < reports < slurm_plugin):\n" + \
        "\n".join(upward)


def test_no_import_cycles():
    edges, _ = graph()
    found = cycles(edges)
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_function_level_and_string_imports(tmp_path):
    (tmp_path / "ledger").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "slurm_plugin").mkdir()
    for package in LAYERS:
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "ledger" / "a.py").write_text(
        "def f():\n    from slurm_plugin import b\n\nX = ('reports.c:COMMANDS', 'reports')\n")
    (tmp_path / "slurm_plugin" / "b.py").write_text("from ledger import a\n")
    (tmp_path / "reports" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slurm_plugin import b\n")
    edges, upward = graph(tmp_path)
    assert upward == ["ledger.a:2 -> slurm_plugin.b", "ledger.a:4 -> reports.c",
                      "reports.c:3 -> slurm_plugin.b"]
    assert cycles(edges) == [["ledger.a", "slurm_plugin.b"]]
