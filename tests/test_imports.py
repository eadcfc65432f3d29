"""The import graph of lib/ has no cycle: data flows one way (volume -> slice -> tensor ->
prediction -> metric -> results), and a module imported inside a function counts too. Every
module of every package counts (``lib/**/*.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

from lib.common.paths import PROJECT_ROOT

LIB = PROJECT_ROOT / "lib"


def module_name(path: Path, root: Path = PROJECT_ROOT) -> str:
    """``lib/seg/train.py`` -> ``lib.seg.train``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PROJECT_ROOT) -> set[str]:
    """The lib modules ``path`` imports anywhere in it (top level or inside functions, under
    ``TYPE_CHECKING`` too): ``from lib.seg import train`` and ``from lib.seg.train import fit``
    both import ``lib.seg.train``; relative imports are resolved against ``path``'s package."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from . import x
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base == "lib" or base.startswith("lib."):
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}  # names that are modules
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lib.")}
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the lib modules it imports (packages' ``__init__`` left out: docstrings only)."""
    modules = {module_name(p): p for p in LIB.rglob("*.py") if p.name != "__init__.py"}
    return {name: imports(path) & set(modules) for name, path in modules.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_name_the_modules_of_packages(tmp_path):
    pkg = tmp_path / "lib" / "seg"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from lib.seg import train\nfrom lib.data.slices import SliceSet\n"
                              "from . import forward\nfrom .models import build_model\n"
                              "def f():\n    import lib.common.env as env\n")
    assert module_name(pkg / "x.py", tmp_path) == "lib.seg.x"
    assert {"lib.seg.train", "lib.data.slices", "lib.seg.forward", "lib.seg.models",
            "lib.common.env"} <= imports(pkg / "x.py", tmp_path)


def test_the_graph_walks_every_package():
    edges = graph()
    assert {"lib.data.task", "lib.seg.train", "lib.synth.vae", "lib.study.run", "lib.common.paths",
            "lib.publish"} <= set(edges)
    assert "lib.data.images2d" in edges["lib.data.volumes"]
    assert "lib.seg.train" in edges["lib.seg.workflow"]  # from lib.seg.train import ...
    assert "lib.synth.vae" in edges["lib.study.run"]  # from lib.synth import vae
    assert not [m for m in edges if m.count(".") != 2 and m != "lib.publish"], "lib/ holds packages"


def test_lib_has_no_import_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_publishing_markdown_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, lib.publish; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT).returncode == 0
