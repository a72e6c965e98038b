"""The layering rule, checked on the source: doors call the operations layer and never reach an
engine (no import of carrier.ansible or of a PTY engine module), and only carrier.ops calls
policy.decide for operations."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import carrier

ROOT = Path(carrier.__file__).parent
DOORS = ("mail/door.py", "mcp/tools_ops.py", "mcp/tools_mail.py", "mcp/server.py", "jobs/cli.py",
         "jobs/ptycli.py", "schedule_cli.py")
ENGINE_MODULES = ("carrier.ansible", "carrier.jobs.pty", "carrier.jobs.ptyengine", "carrier.jobs.ptytmux",
                  "carrier.jobs.ptyproc", "carrier.jobs.ptybase", "carrier.jobs.tmuxctl",
                  "carrier.jobs.engines")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_no_door_imports_an_engine() -> None:
    for door in DOORS:
        bad = [m for m in _imports(ROOT / door) if m.startswith(ENGINE_MODULES)]
        assert not bad, f"{door} imports {bad}: go through carrier.ops"


def test_doors_never_reach_engine_objects() -> None:
    for door in DOORS:
        text = (ROOT / door).read_text()
        for reach in (r"\.engines\[", r"\.ssh\.", r"jobs\.pty\b(?!cli)", r"jobs\.inventory", r"jobs\.catalog",
                      r"policy\.decide\("):
            assert not re.search(reach, text), f"{door} reaches {reach!r}: that belongs below the door"


def test_only_ops_calls_policy_decide_for_operations() -> None:
    callers = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                     if "policy.decide(" in p.read_text() or ".policy.decide(" in p.read_text())
    assert callers == ["ops/service.py"], callers
