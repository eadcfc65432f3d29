"""The import graph of lib/ has no cycle: data flows one way (volume -> slice -> tensor ->
prediction -> metric -> results), and a module imported inside a function counts too."""

from __future__ import annotations

import ast

from lib.paths import PROJECT_ROOT

LIB = PROJECT_ROOT / "lib"


def imports(path) -> set[str]:
    """The lib modules ``path`` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib"):
            if node.module == "lib":
                found |= {f"lib.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lib.")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"lib.{p.stem}": p for p in LIB.glob("*.py") if p.stem != "__init__"}
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


def test_lib_has_no_import_cycle():
    edges = graph()
    assert "lib.msd" in edges and "lib.images2d" in edges["lib.volumes"]
    found = cycle(edges)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_publishing_markdown_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, lib.publish; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT).returncode == 0
