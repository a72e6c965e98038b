"""Become passwords from named secrets, through the MCP door (a real client session): a playbook with
``become: true`` on a sandbox host whose sudo asks for a password succeeds for a role with
``become_secret``, fails for a role without one, and the secret is nowhere in the state directory
(artifacts, worker logs, the store and its SQL dump), the job output or the tool results."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mail_support import write_secret
from mcp.client.client import Client
from mcp_http_support import ROLES, data_of, load, write_door_config

from carrier.config import Config
from carrier.mcp.server import build_server
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

PLAYBOOK = """\
- name: Become root with the sudo password
  hosts: all
  gather_facts: false
  become: true
  tasks:
    - name: Who am I after become
      ansible.builtin.command: id -u
      register: who
      changed_when: false
    - name: It is root
      ansible.builtin.assert:
        that: who.stdout == "0"
"""


def _site(sandbox: Sandbox, directory: Path, role: str) -> Config:
    books = directory / "books"
    books.mkdir(parents=True)
    (books / "become_check.yml").write_text(PLAYBOOK)
    (books / "become_check.meta.yml").write_text("description: id -u after become\ndefault_limit: web1\n")
    secret = directory / "web_sudo.pass"
    write_secret(secret, sandbox.layout.password_file("sudo").read_text())
    roles = {**ROLES,
             "web": {"playbooks": ["*"], "hosts": "all", "pty": True, "become_secret": "web_sudo",
                     "secrets": ["web_sudo"]},
             "nosecret": {"playbooks": ["*"], "hosts": "all"}}
    return load(write_door_config(
        sandbox, directory, port_shift=31, mcp={"stdio_role": role},
        extra={"playbook_dirs": [str(books)], "roles": roles,
               "secrets": {"web_sudo": {"file": str(secret)}}}))


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="csecret-", dir="/var/tmp"))
    directory.chmod(0o700)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(config: Config) -> tuple[dict[str, Any], list[Any]]:
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    results: list[Any] = []

    async def session() -> dict[str, Any]:
        async with Client(server) as client:
            ran = data_of(await client.call_tool(
                "playbook_run", {"playbook": "become_check", "wait": True, "timeout": 240}))
            results.append(ran)
            output = data_of(await client.call_tool("job_output", {"job_id": ran["job_id"],
                                                                  "max_bytes": 1 << 20}))
            results.append(output)
            return ran

    try:
        ran = anyio.run(session)
    finally:
        context.close()
    return ran, results


def _everywhere(root: Path, needle: bytes) -> list[str]:
    """Files under ``root`` holding ``needle``, and the store's SQL dump when it does."""
    found = [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
    for db in root.rglob("*.db"):
        with sqlite3.connect(db) as conn:
            if needle.decode() in "\n".join(conn.iterdump()):
                found.append(f"{db} (dump)")
    return found


def test_a_become_playbook_gets_the_role_secret_and_it_lands_nowhere(sandbox: Sandbox, workdir: Path) -> None:
    password = sandbox.layout.password_file("sudo").read_text().strip()
    before = set(Path(tempfile.gettempdir()).glob("carrier-become-*"))
    config = _site(sandbox, workdir / "web", "web")
    ran, results = _run(config)
    assert ran["status"] == "succeeded", ran
    assert "web1" in json.dumps(ran["summary"]), ran
    text = json.dumps(results)
    assert password not in text  # tool results, the job output
    assert "Who am I after become" in text  # the output is there, just not the secret
    assert not _everywhere(config.state_dir, password.encode())
    assert set(Path(tempfile.gettempdir()).glob("carrier-become-*")) == before  # the FIFO is gone
    # One audit row for the run names the secret (never its value).
    rows = []
    for db in config.state_dir.rglob("*.db"):
        with sqlite3.connect(db) as conn:
            rows += [" ".join(map(str, r)) for r in conn.execute("SELECT * FROM audit")]
    named = [row for row in rows if "web_sudo" in row]
    assert len(named) == 1 and "become_check" in named[0], rows


def test_a_role_without_become_secret_cannot_become(sandbox: Sandbox, workdir: Path) -> None:
    config = _site(sandbox, workdir / "plain", "nosecret")
    ran, results = _run(config)
    assert ran["status"] == "failed", ran
    assert "password" in json.dumps(results).lower()  # sudo asked for one; none was given
    assert os.path.isdir(config.state_dir)
