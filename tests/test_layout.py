"""The layout rules of issue 18, checked by parsing the package (docs/layout.md states them):

- no import cycle among gradfd's modules, counting imports inside functions and under ``TYPE_CHECKING``, and
  counting that importing ``gradfd.a.b`` runs ``gradfd/a/__init__.py`` first;
- no function in ``gradfd/`` longer than ``MAX_FUNCTION_LINES``, its docstring aside;
- ``import gradfd`` does not import the demo and benchmark material, and the CLI imports it only when asked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gradfd"
MAX_FUNCTION_LINES = 120
DEMO_MODULES = ("gradfd.demo",)  # demo and benchmark material: never imported by `import gradfd`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _with_parents(name: str) -> list[str]:
    """``gradfd.a.b`` -> the modules its import runs: ``gradfd.a`` and ``gradfd.a.b`` (``gradfd`` itself aside:
    every module is inside it, so the root package's own imports are the rule checked separately)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def imports_of(name: str) -> set[str]:
    """The gradfd modules that importing ``name`` may run, lazy imports included."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.module, node.level)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t.startswith("gradfd."):
                implied = _with_parents(t)[:-1]  # packages on the way, run before t
                # a package above the importer has already run (Python runs gradfd/x/__init__.py before any module
                # of gradfd.x), so it is an edge only where it is named itself (``from gradfd.x import y``)
                found.update(m for m in implied if m in MODULES and not name.startswith(m + "."))
                if t in MODULES:
                    found.add(t)
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_gradfds_modules():
    graph = {m: imports_of(m) for m in MODULES if m != "gradfd"}
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        detail.append(" / ".join(f"{m} -> {sorted(graph[m] & set(comp))}" for m in comp))
    assert not cycles, "import cycles among gradfd's modules:\n" + "\n".join(detail)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_a_lazy_import_counts():
    tree_text = "def f():\n    from .b import x\n"
    tree = ast.parse(tree_text)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("gradfd.a", False, node.module, node.level) == "gradfd.b"
    assert _with_parents("gradfd.engine.loop") == ["gradfd.engine", "gradfd.engine.loop"]


def test_a_sibling_import_inside_a_package_is_no_edge_to_the_package():
    # gradfd.structured.analysis importing gradfd.structured.values does not re-run gradfd/structured/__init__.py
    if "gradfd.structured.analysis" in MODULES:
        assert "gradfd.structured" not in imports_of("gradfd.structured.analysis")


def _function_lengths():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                first = body[0]
                has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                           and isinstance(first.value.value, str))
                start = body[1].lineno if has_doc and len(body) > 1 else first.lineno
                yield f"{name}.{node.name} (line {node.lineno})", node.end_lineno - start + 1


def test_no_function_is_longer_than_the_limit():
    long = {where: n for where, n in _function_lengths() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring aside): {long}"


def _imported_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    return {m for m in out if m.startswith("gradfd")}


def test_import_gradfd_does_not_import_the_demo_material():
    loaded = _imported_by("import gradfd")
    assert not {m for m in loaded if m.startswith(DEMO_MODULES)}, loaded
    assert "gradfd.cli" not in loaded


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_holds(name):
    tree = ast.parse(MODULES[name].read_text())
    assert ast.get_docstring(tree), f"{name} has no module docstring"


def test_the_cli_imports_the_demo_material_only_when_asked():
    loaded = _imported_by("import gradfd.cli")
    assert not {m for m in loaded if m.startswith(DEMO_MODULES)}, loaded
