"""No import cycles among lepton_ai modules.

A cycle ties modules together: neither can be read, tested or changed alone, and
at import time one sees the other half-initialised. Every import counts, also one
inside a function (a lazy import defers the cycle, it does not remove it), except:

* under ``if TYPE_CHECKING:`` - never executed, it only names a type for mypy;
* under ``if __name__ == "__main__":`` - run as a script, the module is ``__main__``,
  a different module from the one the cycle would reach back to (this is how
  ``python -m lepton_ai.node.coordinator`` hands over to ``node.programs``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "lepton_ai"

# Cycles that predate this test, each with why it is still there. Remove an entry
# when its cycle is broken; a new cycle (or a known one that grows) fails the test.
KNOWN_CYCLES: set[frozenset[str]] = {
    # sources imports the Parquet reader lazily (pyarrow is optional); parquet
    # builds on sources' Source types.
    frozenset({"lepton_ai.data.parquet", "lepton_ai.data.sources"}),
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _skipped(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` blocks."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _skipped(child.test):
            yield from (n for stmt in child.orelse for n in _imports_in(stmt))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _imports(child)


def _imports_in(stmt: ast.stmt) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        yield stmt
    yield from _imports(stmt)


def _targets(module: str, is_package: bool, imp: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (``from m import x``: ``m.x`` if that is a
    module, else ``m``)."""
    if isinstance(imp, ast.Import):
        return [alias.name for alias in imp.names]
    base = imp.module or ""
    if imp.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - imp.level + 1]
        base = ".".join([*parts, *([imp.module] if imp.module else [])])
    return [base, *(f"{base}.{alias.name}" for alias in imp.names)]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for imp in _imports(ast.parse(path.read_text(), str(path))):
            edges.update(t for t in _targets(name, is_package, imp) if t in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    # node.programs imports the coordinator inside functions only.
    assert "lepton_ai.node.coordinator" in graph["lepton_ai.node.programs"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_no_import_cycles() -> None:
    graph = import_graph()
    new = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    detail = "; ".join(
        " <-> ".join(sorted(c))
        + " ("
        + ", ".join(f"{m} -> {sorted(graph[m] & c)}" for m in sorted(c))
        + ")"
        for c in new
    )
    assert not new, f"import cycles: {detail}"
