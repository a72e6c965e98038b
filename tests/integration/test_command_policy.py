"""The command policy through the real doors (issue 13 item 5): a role with ``exec: true, shell:
false`` runs no shell, interpreter or launcher, and a role's ``commands:`` list names the only
programs it may run. Asked through `carrier serve`: MCP over HTTPS with a token (``ssh_exec``,
``job_start``) and signed mail (``exec``, ``job start``). A refusal reads ``not allowed: ...`` and
nothing runs on the sandbox host; an allowed command still runs there.

The markers live in a directory the sandbox hosts' login user (carrier-sbx) may write, so a marker
there means the command ran on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from auth_support import primary_fingerprint
from door_support import db_rows, identities, send_signed, serving, text_of, wait_replies
from mail_support import token
from mcp_http_support import mcp_client
from ruamel.yaml import YAML

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


@dataclass
class World:
    sandbox: Sandbox
    state: Path
    markers: Path
    url: str
    tokens: dict[str, str]
    people: dict[str, Any]


def _roles(markers: Path) -> dict[str, Any]:
    return {
        "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": False, "pty": True},
        "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True},
        "webops": {"hosts": "all", "exec": True, "pty": True,
                   "commands": [f"touch {markers}/ok-*", "/usr/bin/uptime"]},
    }


def _carrier(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "carrier", *args[:2], "--config", str(config), *args[2:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def world(sandbox: Sandbox) -> Iterator[World]:
    markers = Path(tempfile.mkdtemp(prefix="cpolicy-", dir="/var/tmp"))
    markers.chmod(0o1777)  # the hosts log in as carrier-sbx
    users = [{"email": address("ops"), "role": "operator",
              "fingerprint": primary_fingerprint(sandbox.layout.gnupg_home("ops"), address("ops"))}]
    try:
        with serving(sandbox, roles=_roles(markers), users=users) as (serve, directory), \
                identities(sandbox) as people:
            tokens = {}
            for role in ("operator", "webops"):
                issued = _carrier(directory / "carrier.yml", "token", "issue", f"{role}@tokens.test",
                                  "--role", role, "--ttl", "3600")
                assert issued.returncode == 0, issued.stderr
                tokens[role] = issued.stdout.strip()
            serve.start()
            port = int(YAML(typ="safe").load((directory / "carrier.yml").read_text())["mcp"]["port"])
            url = f"https://127.0.0.1:{port}/mcp"
            yield World(sandbox, directory / "state", markers, url, tokens, people)
    finally:
        shutil.rmtree(markers, ignore_errors=True)


def _made(w: World) -> list[str]:
    return sorted(p.name for p in w.markers.iterdir())


def _jobs_naming(w: World, word: str) -> list[tuple[Any, ...]]:
    return db_rows(w.state, "SELECT id, kind FROM jobs WHERE spec LIKE ?", (f"%{word}%",))


def _call(w: World, role: str, calls: list[tuple[str, dict[str, Any]]]) -> list[tuple[bool, str]]:
    async def session() -> list[tuple[bool, str]]:
        out = []
        async with mcp_client(w.url, w.tokens[role], w.sandbox.layout.tls_cert) as client:
            for tool, args in calls:
                result = await client.call_tool(tool, args)
                out.append((not result.is_error, "".join(getattr(c, "text", "") for c in result.content)))
        return out

    return anyio.run(session)


def test_mcp_refuses_interpreters_to_a_role_without_shell(world: World) -> None:
    m = world.markers
    refused = _call(world, "operator", [
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"sh -c 'touch {m}/mcp-sh'"}),
        ("ssh_exec", {"host_or_pattern": "web1",
                      "command": f"python3 -c \"open('{m}/mcp-py', 'w')\""}),
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"/usr/bin/env touch {m}/mcp-env"}),
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"-c 'touch {m}/mcp-opt'"}),
        ("job_start", {"host": "web1", "command": f"bash -c 'touch {m}/mcp-pty'"}),
    ])
    assert [ok for ok, _ in refused] == [False] * 5, refused
    texts = [text for _, text in refused]
    assert "not allowed: role operator has no shell: sh is a shell (needs shell: true)" in texts[0], texts
    assert "not allowed: role operator has no shell: python3 is an interpreter (needs shell: true)" \
        in texts[1], texts
    assert "env is a launcher" in texts[2] and "not allowed:" in texts[2], texts
    assert "not allowed: the command starts with '-c'" in texts[3], texts
    assert "not allowed: role operator has no shell: bash is a shell" in texts[4], texts
    assert _jobs_naming(world, "mcp-") == []
    # An ordinary program still runs, on the host.
    [(ok, text)] = _call(world, "operator", [
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"touch {m}/mcp-allowed"})])
    assert ok and "succeeded" in text, text
    assert _made(world) == ["mcp-allowed"]


def test_mcp_commands_list_allows_only_what_it_names(world: World) -> None:
    m = world.markers
    before = _made(world)
    answers = _call(world, "webops", [
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"touch {m}/ok-list"}),
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"touch {m}/list-other"}),
        ("ssh_exec", {"host_or_pattern": "web1", "command": f"mkdir {m}/list-dir"}),
        ("job_start", {"host": "web1", "command": f"touch {m}/pty-other"}),
    ])
    assert [ok for ok, _ in answers] == [True, False, False, False], answers
    assert f"not allowed: role webops may run touch only as touch '{m}/ok-*'" in answers[1][1], answers
    assert "not allowed: role webops may not run mkdir: its commands: list allows" in answers[2][1], answers
    assert "may run touch only as" in answers[3][1], answers
    assert sorted(set(_made(world)) - set(before)) == ["ok-list"]


def _wait_for(path: Path, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.1)
    return False


def test_signed_mail_refuses_interpreters_and_runs_nothing(world: World) -> None:
    m = world.markers
    tag = token("cmdpolicy")
    lines = [f"exec web1 python3 -c \"open('{m}/mail-py', 'w')\"",
             f"exec web1 sh -c 'touch {m}/mail-sh'",
             f"job start web1 perl -e 'open(F, \">{m}/mail-pty\")'"]
    send_signed(world.sandbox, world.people["ops"], "\n".join(lines) + "\n", tag)
    [reply] = wait_replies(world.sandbox, "ops", tag, 1, settle=2.0)
    text = text_of(reply)
    refusal = "not allowed: role operator has no shell: {} (needs shell: true)"
    for what in ("python3 is an interpreter", "sh is a shell", "perl is an interpreter"):
        assert refusal.format(what) in text, text
    assert _jobs_naming(world, "mail-") == []
    assert not any(name.startswith("mail-") for name in _made(world))
    # The same sender, an ordinary program: it runs on the host.
    ok_tag = token("cmdpolicy-ok")
    send_signed(world.sandbox, world.people["ops"], f"exec web1 touch {m}/mail-allowed\n", ok_tag)
    wait_replies(world.sandbox, "ops", ok_tag, 1)
    assert _wait_for(m / "mail-allowed")
    assert [name for name in _made(world) if name.startswith("mail-")] == ["mail-allowed"]
