"""The package layout stays true: imports point one way along the data flow, no cycles.

Walks every module of ``streamer/`` with ``ast`` (imports at module level, inside functions
and under ``TYPE_CHECKING`` alike) and checks the rules of README's architecture section:

    vocabulary (errors, events, instruments, config, settings, backoff, paths, lifecycle)
      <- feeds <- book <- calib <- daemon <- cli           (pricing <- models <- calib)
      <- publish <- client <- daemon;  tools sit beside cli

``models`` and ``pricing`` know nothing of ``calib``; ``client`` (what a bot imports) knows
nothing of ``daemon``, ``feeds``, ``book`` or ``calib``; no command module of ``cli`` imports
another (``cli.main`` registers them all); nothing below ``cli`` imports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "streamer"

VOCABULARY = frozenset(
    {"errors", "events", "instruments", "config", "settings", "backoff", "paths", "lifecycle"}
)
STAGES = frozenset(
    {"pricing", "models", "feeds", "book", "calib", "publish", "client", "daemon", "tools", "cli"}
)
# group -> the groups it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "vocabulary": frozenset(),
    "pricing": frozenset(),
    "models": frozenset({"pricing", "vocabulary"}),
    "feeds": frozenset({"vocabulary"}),
    "book": frozenset({"feeds", "vocabulary"}),
    "calib": frozenset({"book", "models", "pricing", "vocabulary"}),
    "publish": frozenset({"vocabulary"}),
    "client": frozenset({"publish", "models", "pricing", "vocabulary"}),
    "daemon": frozenset(
        {"feeds", "book", "calib", "models", "pricing", "publish", "client", "vocabulary"}
    ),
    "tools": STAGES - {"cli", "tools"} | {"vocabulary"},
    "cli": STAGES - {"cli"} | {"vocabulary"},
    "root": frozenset({"cli"}),  # streamer/__main__.py
}


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, name: str, modules: Mapping[str, Path]) -> set[str]:
    """The internal modules ``path`` imports (module ``name``), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets: Iterable[str] = (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" mod
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            t = target
            while t and t not in modules:  # "import streamer.x.y" of a name inside x.y
                t = t.rpartition(".")[0]
            if t.startswith("streamer") and t != name:
                out.add(t)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = all_modules(root)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def group_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "root"
    top = parts[1]
    if top in VOCABULARY:
        return "vocabulary"
    if top in STAGES:
        return top
    raise AssertionError(f"{module}: not in a known room of the layout")


def violations(edges: Mapping[str, set[str]]) -> list[str]:
    """Every import that breaks a layering rule."""
    bad = []
    for src, targets in sorted(edges.items()):
        g = group_of(src)
        for dst in sorted(targets):
            h = group_of(dst)
            if dst == "streamer":  # __version__
                continue
            if h != g and h not in ALLOWED[g]:
                bad.append(f"{src} imports {dst} ({g} may not import {h})")
            elif g == h == "cli" and not src.endswith(".main") and dst != "streamer.cli":
                bad.append(f"{src} imports {dst} (a command module imports another)")
    return bad


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_follow_the_layers() -> None:
    assert violations(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_every_module_sits_in_a_room() -> None:
    for name in all_modules():
        group_of(name)  # raises for a module outside the layout


@pytest.mark.parametrize(
    ("src", "text", "expected"),
    [
        ("models/svi.py", "from streamer.calib import lm\n", "models may not import calib"),
        ("client/surface.py", "import streamer.daemon.pipeline\n", "client may not import daemon"),
        ("feeds/base.py", "from streamer.book.book import Book\n", "feeds may not import book"),
        ("cli/run.py", "from streamer.cli import replay\n", "a command module imports another"),
        ("calib/data.py", "    from streamer.publish import payloads\n", "calib may not import"),
    ],
)
def test_the_checker_catches_a_violation(
    tmp_path: Path, src: str, text: str, expected: str
) -> None:
    """A copy of the package with one rule broken (also inside a function): it is reported."""
    copy = tmp_path / "streamer"
    for path in ROOT.rglob("*.py"):
        dst = copy / path.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    target = copy / src
    body = f"def _broken() -> None:\n{text}" if text.startswith(" ") else text
    target.write_text(target.read_text(encoding="utf-8") + "\n\n" + body, encoding="utf-8")
    found = violations(graph(copy))
    assert any(expected in v for v in found), found


def test_the_checker_catches_a_cycle(tmp_path: Path) -> None:
    copy = tmp_path / "streamer"
    for path in ROOT.rglob("*.py"):
        dst = copy / path.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    lm = copy / "calib" / "lm.py"
    lm.write_text(lm.read_text(encoding="utf-8") + "\nfrom streamer.calib import calibrator\n")
    assert any("streamer.calib.lm" in c for c in cycles(graph(copy)))
