"""The import graph: no cycles anywhere, and the layering of docs/architecture.md.

The rules are read from the table between the ``rooms`` markers of
``docs/architecture.md``, so the page and the code cannot drift apart.
Every import counts: module level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("provider", "coordinator_stub")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Modules of ours that ``name`` imports (``from a import b`` is ``a.b`` if a module)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                targets.append(full if full in known else module)
        out.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def rooms() -> dict[str, list[str]]:
    """``room -> may import`` from the architecture page (``["any"]`` for any)."""
    text = ARCHITECTURE.read_text()
    table = text.split("<!-- rooms: begin -->")[1].split("<!-- rooms: end -->")[0]
    rules: dict[str, list[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        allowed = re.findall(r"`([^`]+)`", cells[2])
        rules[cells[0].strip("`")] = ["any"] if cells[2] == "any" else allowed
    return rules


def room_of(module: str, rules: dict[str, list[str]]) -> str | None:
    best = None
    for room in rules:
        if (module == room or module.startswith(room + ".")) and (
            best is None or len(room) > len(best)
        ):
            best = room
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def violations(edges: dict[str, set[str]], rules: dict[str, list[str]]) -> list[str]:
    out = []
    for importer, targets in sorted(edges.items()):
        room = room_of(importer, rules)
        if room is None:
            out.append(f"{importer} is in no room of docs/architecture.md")
            continue
        allowed = rules[room]
        for target in sorted(targets):
            if room_of(target, rules) == room:
                continue
            if allowed == ["any"] and target.startswith("provider"):
                continue
            if any(target == a or target.startswith(a + ".") for a in allowed):
                continue
            out.append(f"{importer} ({room}) imports {target}, not allowed for {room}")
    return out


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_imports_follow_the_architecture_page() -> None:
    rules = rooms()
    assert "provider.coordinator" in rules and "provider.engine" in rules
    assert violations(graph(), rules) == []


def test_every_top_level_module_has_a_room_of_its_own() -> None:
    rules = rooms()
    for name in modules():
        if name.startswith("provider"):
            # The bare package room holds only provider/__init__.py: a new
            # top-level module must be given a row on the page.
            assert room_of(name, rules) != "provider" or name == "provider", name


def test_the_checks_catch_what_they_are_for() -> None:
    """The detectors themselves, on made-up graphs."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    rules = {"provider.engine": ["provider.openai"], "provider.openai": [], "provider.x": ["any"]}
    edges = {
        "provider.engine.mlx": {"provider.openai.request", "provider.engine"},
        "provider.openai.request": {"provider.engine.mlx"},
        "provider.x.y": {"provider.engine"},
    }
    assert violations(edges, rules) == [
        "provider.openai.request (provider.openai) imports provider.engine.mlx, "
        "not allowed for provider.openai"
    ]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from provider.engine import mlx", {"provider.engine.mlx"}),
        ("from provider.engine import EngineError", {"provider.engine"}),
        ("import provider.logs", {"provider.logs"}),
        ("def f():\n    from provider import cli", {"provider.cli"}),
        ("import json", set()),
    ],
)
def test_imports_of_reads_every_form(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    known = {"provider.engine", "provider.engine.mlx", "provider.logs", "provider.cli"}
    assert imports_of("provider.x.m", path, known) == expected
