"""Cores are sans-I/O: they import no asyncio, socket, time, os, random or threading.

Time and randomness are passed in, so the seeded simulator can drive the very
same code that runs in production (DESIGN.md section 4).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "lepton_ai"
CORE_GLOBS = (
    "consensus/core*.py",
    "consensus/ready_order.py",
    "consensus/leader_search.py",
    "compute/scheduler*.py",
    "compute/scheduler/*.py",
    "compute/job_state.py",
    "monitor/phi.py",
    "monitor/alerts.py",
    "monitor/events.py",
    "monitor/tasklog.py",
    "node/control.py",
    "serve/policy*.py",
    "serve/spec.py",
    "heal/*.py",
    "storage/meta.py",
)
FORBIDDEN = {
    "asyncio",
    "socket",
    "time",
    "os",
    "random",
    "threading",
    "subprocess",
    "selectors",
    "signal",
}


def _core_modules() -> list[Path]:
    found = {p for pattern in CORE_GLOBS for p in PACKAGE.glob(pattern)}
    return sorted(p for p in found if p.name != "__init__.py")


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_cores_exist() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in _core_modules()}
    assert any(n.startswith("consensus/") for n in names), names
    assert any(n.startswith("compute/scheduler") for n in names), names
    assert "monitor/phi.py" in names


@pytest.mark.parametrize("pattern", CORE_GLOBS)
def test_every_core_glob_matches_a_module(pattern: str) -> None:
    # A glob that matches nothing (a module renamed or moved) checks nothing, silently.
    matched = [p for p in PACKAGE.glob(pattern) if p.name != "__init__.py"]
    assert matched, f"CORE_GLOBS entry {pattern!r} matches no module under {PACKAGE}"


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_imports_no_io(path: Path) -> None:
    bad = _imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.name} is a sans-I/O core but imports {sorted(bad)}"
