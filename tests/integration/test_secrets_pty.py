"""Typing named secrets into terminal jobs through the real doors: a real MCP client session
(``job_input(secret=...)``) and signed mail through `carrier serve` (``job input <job> secret
<name>``). A ``sudo -k; sudo true`` job on a sandbox host whose sudo asks for a password is
answered; a program that echoes what is typed shows a mask; the secret appears nowhere: tool
results, the store and its SQL dump, the kept output and screens, serve's log, the replies."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from door_support import identities, send_signed, serving, text_of, wait_replies
from mail_support import token, write_secret
from mcp.client.client import Client
from mcp_http_support import ROLES, data_of, error_of, load, write_door_config

from carrier.mcp.server import build_server
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

MASK = "********"
#: sudo asks (timestamp_timeout=0 in the sandbox: always), then `read` echoes what is typed.
COMMAND = 'sudo -k; sudo true && echo SUDO-OK; read -r x; echo "typed:$x"'


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="csecpty-", dir="/var/tmp"))
    directory.chmod(0o700)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _password(sandbox: Sandbox) -> str:
    return sandbox.layout.password_file("sudo").read_text().strip()


def _secrets(sandbox: Sandbox, directory: Path) -> dict[str, Any]:
    secret = directory / "web_sudo.pass"
    write_secret(secret, _password(sandbox) + "\n")
    return {"web_sudo": {"file": str(secret)}, "other": {"env": "HOME"}}


def _found_in(root: Path, needle: str) -> list[str]:
    found = [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]
    for db in root.rglob("*.db"):
        with sqlite3.connect(db) as conn:
            if needle in "\n".join(conn.iterdump()):
                found.append(f"{db} (dump)")
    return found


def _audit(root: Path) -> list[str]:
    rows: list[str] = []
    for db in root.rglob("*.db"):
        with sqlite3.connect(db) as conn:
            rows += [" ".join(map(str, r)) for r in conn.execute("SELECT * FROM audit")]
    return rows


def test_job_input_secret_over_mcp(sandbox: Sandbox, workdir: Path) -> None:
    password = _password(sandbox)
    roles = {**ROLES, "web": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True,
                              "become_secret": "web_sudo"}}
    config = load(write_door_config(sandbox, workdir, port_shift=33, mcp={"stdio_role": "web"},
                                    extra={"roles": roles, "secrets": _secrets(sandbox, workdir)}))
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    results: list[Any] = []

    async def call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        got = data_of(await client.call_tool(tool, args))
        results.append(got)
        return got

    async def session() -> None:
        async with Client(server) as client:
            job = (await call(client, "job_start", {"host": "web1", "command": COMMAND}))["job_id"]
            asked = await call(client, "job_wait", {"job_id": job, "pattern": r"password for", "timeout": 60})
            assert asked["wait"]["reason"] == "match", asked
            refused = error_of(await client.call_tool("job_input", {"job_id": job, "secret": "other"}))
            assert "may not use secret 'other'" in refused and "web_sudo" in refused
            bad = error_of(await client.call_tool("job_input", {"job_id": job, "secret": "web_sudo",
                                                                "text": "x"}))
            assert "not both" in bad
            await call(client, "job_input", {"job_id": job, "secret": "web_sudo"})
            ok = await call(client, "job_wait", {"job_id": job, "pattern": "SUDO-OK", "timeout": 60})
            assert ok["wait"]["reason"] == "match", ok
            await call(client, "job_input", {"job_id": job, "secret": "web_sudo"})
            await call(client, "job_wait", {"job_id": job, "pattern": "typed:", "timeout": 60})
            done = await call(client, "job_wait", {"job_id": job, "timeout": 60})
            assert done["done"] and done["job"]["status"] == "succeeded", done
            screen = await call(client, "job_screen", {"job_id": job})
            output = await call(client, "job_output", {"job_id": job, "max_bytes": 1 << 20})
            assert f"typed:{MASK}" in output["text"], output["text"]
            assert f"typed:{MASK}" in json.dumps(screen)

    _run_leaving_no_trace(session, context, results, config.state_dir, password)
    _two_allowed_rows_name_the_secret(config.state_dir)


def _run_leaving_no_trace(session: Any, context: Any, results: list[Any], state: Path, password: str) -> None:
    """Run the MCP ``session``; then the secret is in no tool result and nowhere under ``state``."""
    try:
        anyio.run(session)
    finally:
        context.close()
    assert password not in json.dumps(results)
    assert not _found_in(state, password)


def _two_allowed_rows_name_the_secret(state: Path) -> None:
    named = [row for row in _audit(state)
             if "decide:pty_input" in row and re.search(r'"secret": ?"web_sudo"', row) and "allowed" in row]
    assert len(named) == 2, _audit(state)[-8:]  # one row per typed secret, naming it


_JOB = re.compile(r"terminal job (j-[a-z2-7]{12}) on")


def _reply_with(sandbox: Sandbox, who: str, tag: str, count: int, needle: str) -> tuple[str, list[str]]:
    texts = [text_of(r) for r in wait_replies(sandbox, who, tag, count, timeout=120)]
    found = [t for t in texts if needle in t]
    assert found, f"no reply with {needle!r} among {len(texts)}: {texts[-1][:2000]}"
    return found[-1], texts


def test_job_input_secret_by_signed_mail(sandbox: Sandbox, workdir: Path) -> None:
    password = _password(sandbox)
    roles = {
        "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "pty": True},
        "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True,
                  "secrets": ["web_sudo"]},
    }
    with serving(sandbox, roles=roles, secrets=_secrets(sandbox, workdir)) as (serve, directory), \
            identities(sandbox) as people:
        serve.start()
        admin, ops = people["admin"], people["ops"]
        tag = token("secmail")
        send_signed(sandbox, admin, f"job start web1 {COMMAND}", tag)
        first, _ = _reply_with(sandbox, "admin", tag, 1, "accepted, terminal job")
        match = _JOB.search(first)
        assert match, first
        job = match.group(1)
        send_signed(sandbox, admin, f"job input {job} secret web_sudo", f"Re: {tag}")
        _reply_with(sandbox, "admin", tag, 2, f"screen of job {job} after the input")
        send_signed(sandbox, admin, f"job input {job} secret web_sudo", f"Re: {tag}")
        _reply_with(sandbox, "admin", tag, 3, f"screen of job {job} after the input")
        result, texts = _reply_with(sandbox, "admin", tag, 4, f"Job {job} succeeded")
        assert "SUDO-OK" in result and f"typed:{MASK}" in result, result

        # A role that does not list the secret is refused, and told which it may use.
        tag2 = token("secdeny")
        send_signed(sandbox, ops, "job start web2 cat", tag2)
        started, _ = _reply_with(sandbox, "ops", tag2, 1, "terminal job")
        other = _JOB.search(started)
        assert other, started
        send_signed(sandbox, ops, f"job input {other.group(1)} secret web_sudo", f"Re: {tag2}")
        denied, denied_texts = _reply_with(sandbox, "ops", tag2, 2, "may not use secret 'web_sudo'")
        assert "it may use: none" in denied, denied
        send_signed(sandbox, ops, f"kill {other.group(1)}", f"Re: {tag2}")
        _reply_with(sandbox, "ops", tag2, 3, "cancel requested")
        serve.stop()
        assert password not in json.dumps(serve.lines)  # serve's log
        assert not any(password in t for t in texts + denied_texts)  # the replies
        assert not _found_in(directory / "state", password)  # the store, outputs, screens
        _two_allowed_rows_name_the_secret(directory / "state")


# --------------------------------------------------------------------------- auto_sudo

#: No `read`: nobody types anything; sudo's prompt is answered by the role's policy.
SUDO_ONLY = "sudo -k; sudo true && echo SUDO-OK"


def test_auto_sudo_answers_over_mcp(sandbox: Sandbox, workdir: Path) -> None:
    password = _password(sandbox)
    roles = {**ROLES, "web": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True,
                              "become_secret": "web_sudo", "auto_sudo": True}}
    config = load(write_door_config(sandbox, workdir, port_shift=34, mcp={"stdio_role": "web"},
                                    extra={"roles": roles, "secrets": _secrets(sandbox, workdir)}))
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    results: list[Any] = []

    async def session() -> None:
        async with Client(server) as client:
            started = data_of(await client.call_tool("job_start", {"host": "web1", "command": SUDO_ONLY}))
            done = data_of(await client.call_tool("job_wait", {"job_id": started["job_id"], "timeout": 60}))
            output = data_of(await client.call_tool("job_output", {"job_id": started["job_id"]}))
            results.extend([started, done, output])
            assert done["done"] and done["job"]["status"] == "succeeded", done
            assert "SUDO-OK" in output["text"] and "password for" in output["text"], output

    _run_leaving_no_trace(session, context, results, config.state_dir, password)
    # The job's start row names the secret that answers; its events say it answered, by name.
    assert any("start" in r and re.search(r'"auto_sudo": ?"web_sudo"', r) for r in _audit(config.state_dir))
    events = [e for db in config.state_dir.rglob("*.db") for e in _auto_sudo_events(db)]
    assert events and all(json.loads(e)["secret"] == "web_sudo" for e in events), events


def _auto_sudo_events(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'job_events'").fetchone():
            return []
        return [r[0] for r in conn.execute("SELECT data FROM job_events WHERE type = 'pty.auto_sudo'")]


def test_auto_sudo_answers_a_job_started_by_signed_mail(sandbox: Sandbox, workdir: Path) -> None:
    password = _password(sandbox)
    roles = {
        "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "pty": True},
        "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True,
                  "become_secret": "web_sudo", "auto_sudo": True},
    }
    with serving(sandbox, roles=roles, secrets=_secrets(sandbox, workdir)) as (serve, directory), \
            identities(sandbox) as people:
        serve.start()
        tag = token("autosudo")
        send_signed(sandbox, people["admin"], f"job start web1 {SUDO_ONLY}", tag)
        result, texts = _reply_with(sandbox, "admin", tag, 2, "succeeded")
        assert "SUDO-OK" in result, result
        serve.stop()
        assert password not in json.dumps(serve.lines)
        assert not any(password in t for t in texts)
        assert not _found_in(directory / "state", password)
