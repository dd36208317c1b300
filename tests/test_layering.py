"""Imports flow down the rooms of DESIGN.md only; nothing imports service, api or cli but their own and the root.

Read from the source (every ``import``/``from ... import`` of ``continual``, at any
depth, lazy ones included), so a shortcut back up the layers fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "continual"

# room -> the rooms it may import (the closure of DESIGN.md's "may import" column; config is everyone's).
BASE = {"config", "procutil"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "procutil": set(),
    "metrics": set(),
    "client": set(),
    "store": {"config"},
    "models": {"config"},
    "ingest": BASE | {"store", "models"},
    "drift": BASE | {"store", "models"},
    "registry": BASE | {"store", "models"},
    "learn": BASE | {"store", "models", "ingest"},
    "gate": BASE | {"store", "models", "ingest", "learn"},
    "triggers": BASE | {"store", "models", "ingest", "learn"},
    "serving": BASE | {"store", "models", "ingest", "registry"},
    "status": BASE | {"store", "triggers"},
}
LOWER = set(ALLOWED) | {"drift", "gate", "triggers", "serving", "status"}
ALLOWED["api"] = LOWER | {"metrics", "api"}
ALLOWED["service"] = LOWER | {"metrics", "api", "service"}  # app.py is the composition root
ALLOWED["cli"] = LOWER | {"metrics", "service", "cli", "client"}
ALLOWED["demo"] = {"config", "client", "store", "demo"}


def room_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "package"


def continual_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported room) for every import of a continual module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "continual" else [f"continual.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "continual" and len(parts) > 1 and parts[1] != "__version__":
                out.append((node.lineno, parts[1]))
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downward(path: Path) -> None:
    room = room_of(path)
    if room == "package":
        return
    allowed = ALLOWED[room] | {room}
    wrong = [
        f"line {line}: continual.{imported}" for line, imported in continual_imports(path) if imported not in allowed
    ]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({room}) may import only {sorted(allowed)}; found {wrong}"


def test_every_room_is_known() -> None:
    rooms = {room_of(p) for p in MODULES} - {"package"}
    assert rooms <= set(ALLOWED), f"rooms without a layering rule: {sorted(rooms - set(ALLOWED))}"


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from continual.service.app import serve\n    import continual.api\n")
    assert continual_imports(bad) == [(2, "service"), (3, "api")]
