"""Conformance of the doors: one operation asked through signed mail (`carrier serve`), MCP over stdio
(a real `carrier mcp` subprocess), MCP over HTTPS with a token (the real door of `carrier serve`) and
the CLI (a real `carrier` process) gets the same decision for the same role, writes exactly one audit
row of the same shape, and runs the same thing.

Also: every registered MCP tool and every mail verb goes through the operations layer — a tool or
verb added without it writes no audit row (or has no entry in the verb table) and fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from auth_support import primary_fingerprint
from door_support import db_rows, identities, send_signed, serving, text_of, wait_replies
from mail_support import token, write_secret
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp_http_support import mcp_client
from ruamel.yaml import YAML

from carrier.mail.commands import EXAMPLES
from carrier.mail.door import VERBS
from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox, dump_yaml

pytestmark = pytest.mark.sandbox

ROLES = {
    "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": False, "pty": True},
    "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True},
    "webonly": {"playbooks": ["ping"], "hosts": "web1", "exec": True, "shell": False, "pty": True},
    "viewer": {"playbooks": [], "hosts": "all", "exec": False, "shell": False, "pty": False},
}


@dataclass(frozen=True)
class Op:
    """One operation, as each door spells it, and the audit action it is decided as."""

    name: str
    action: str
    mail: str
    tool: str
    args: dict[str, Any]
    cli: tuple[str, ...]


def _ops(tag: str) -> list[Op]:
    return [
        Op("hosts", "inventory", "hosts all", "inventory_hosts", {"pattern": "all"}, ("hosts", "all")),
        Op(
            "exec web1",
            "exec",
            f"exec web1 echo {tag}",
            "ssh_exec",
            {"host_or_pattern": "web1", "command": f"echo {tag}"},
            ("exec", "web1", "--", "echo", tag),
        ),
        Op(
            "exec db1",
            "exec",
            f"exec db1 echo {tag}",
            "ssh_exec",
            {"host_or_pattern": "db1", "command": f"echo {tag}"},
            ("exec", "db1", "--", "echo", tag),
        ),
        Op(
            "ping web1",
            "playbook",
            "run ping on web1",
            "playbook_run",
            {"playbook": "ping", "limit": "web1"},
            ("run", "ping", "--limit", "web1"),
        ),
        Op(
            "admin-only playbook",
            "playbook",
            "run service_restart on web1 check service=cron",
            "playbook_run",
            {
                "playbook": "service_restart",
                "limit": "web1",
                "check": True,
                "extra_vars": {"service": "cron"},
            },
            ("run", "service_restart", "--limit", "web1", "--check", "-e", "service=cron"),
        ),
        Op(
            "terminal job",
            "pty",
            "job start web1 true",
            "job_start",
            {"host": "web1", "command": "true"},
            ("job", "start", "web1", "--", "true"),
        ),
        Op("job list", "job_list", "jobs", "job_list", {}, ("jobs",)),
    ]


def expected(op: str, role: str, admin: bool, scopes: tuple[str, ...] = ()) -> bool:
    """What the policy must answer, written out by hand from docs/architecture.md."""
    if scopes and op != "job list" and "tools:run" not in scopes:
        return False
    if scopes and op == "job list" and "tools:jobs" not in scopes:
        return False
    rules: dict[str, Callable[[], bool]] = {
        "hosts": lambda: True,
        "exec web1": lambda: role != "viewer",
        "exec db1": lambda: role in ("operator", "admin"),
        "ping web1": lambda: role != "viewer",
        "admin-only playbook": lambda: admin and role in ("operator", "admin"),
        "terminal job": lambda: role != "viewer",
        "job list": lambda: True,
    }
    return rules[op]()


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    sandbox: Sandbox
    directory: Path
    state: Path
    configs: dict[str, Path]  # the local user's role -> a carrier.yml on the shared state
    url: str
    tokens: dict[str, str]  # label -> bearer token


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _carrier(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``carrier ARGS`` as a process, ``--config`` after the (sub)command."""
    split = 2 if args[0] in ("job", "token", "enroll") else 1
    argv = [sys.executable, "-m", "carrier", *args[:split], "--config", str(config), *args[split:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(), check=False)


def _audit_after(state: Path, last: int) -> list[dict[str, Any]]:
    rows = db_rows(
        state, "SELECT id, actor, door, action, outcome, detail FROM audit WHERE id > ? ORDER BY id", (last,)
    )
    return [
        {
            "id": r[0],
            "actor": r[1],
            "door": r[2],
            "action": r[3],
            "outcome": r[4],
            "detail": json.loads(r[5] or "{}"),
        }
        for r in rows
    ]


def _last_audit(state: Path) -> int:
    return int(db_rows(state, "SELECT COALESCE(MAX(id), 0) FROM audit")[0][0])


@pytest.fixture(scope="module")
def world(sandbox: Sandbox) -> Iterator[tuple[World, Any, Any]]:
    newbie = primary_fingerprint(sandbox.layout.gnupg_home("newbie"), address("newbie"))
    users = [
        {
            "email": address("ops"),
            "fingerprint": primary_fingerprint(sandbox.layout.gnupg_home("ops"), address("ops")),
            "role": "operator",
        },
        {"email": address("newbie"), "fingerprint": newbie, "role": "webonly"},
    ]
    with serving(sandbox, roles=ROLES, users=users) as (serve, directory), identities(sandbox) as people:
        base = YAML(typ="safe").load((directory / "carrier.yml").read_text())
        configs = {}
        for role in ("operator", "webonly", "viewer"):
            data = {**base, "mcp": {**base["mcp"], "stdio_role": role}}
            path = directory / f"carrier-{role}.yml"
            write_secret(path, dump_yaml(data))
            configs[role] = path
        tokens = {}
        for label, role, scopes in (
            ("operator", "operator", ()),
            ("webonly", "webonly", ()),
            ("viewer", "viewer", ()),
            ("mailscope", "operator", ("tools:mail",)),
        ):
            args = ["token", "issue", f"{label}@tokens.test", "--role", role, "--ttl", "3600"]
            for scope in scopes:
                args += ["--scope", scope]
            issued = _carrier(directory / "carrier.yml", *args)
            assert issued.returncode == 0, issued.stderr
            tokens[label] = issued.stdout.strip()
        serve.start()
        url = f"https://127.0.0.1:{base['mcp']['port']}/mcp"
        yield World(sandbox, directory, directory / "state", configs, url, tokens), serve, people


# --------------------------------------------------------------------------- each door


def _one_decision(rows: list[dict[str, Any]], actor: str, door: str, action: str) -> dict[str, Any]:
    decided = [
        r for r in rows if r["actor"] == actor and r["door"] == door and r["action"].startswith("decide:")
    ]
    assert len(decided) == 1, f"{actor} via {door}: expected one decision row for {action}, got {decided}"
    (row,) = decided
    assert row["action"] == f"decide:{action}"
    assert {"reason", "role", "hosts"} <= set(row["detail"])
    return row


def _by_mail(w: World, people: dict[str, Any], who: str, op: Op) -> bool:
    tag = token("matrix")
    last = _last_audit(w.state)
    send_signed(w.sandbox, people[who], op.mail, tag)
    reply = wait_replies(w.sandbox, who, tag, 1, timeout=120)[0]  # the answer (a result may follow)
    text = text_of(reply)
    row = _one_decision(_audit_after(w.state, last), address(who), "mail", op.action)
    allowed = "not allowed:" not in text
    assert (row["outcome"] == "allowed") == allowed, (text, row)
    return allowed


async def _call(client: Client, op: Op) -> bool:
    result = await client.call_tool(op.tool, op.args)
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error or "not allowed:" in text, text  # a refusal, nothing else
    return not result.is_error


async def _session_ops(
    w: World, client: Client, actor: str, ops: list[Op], role: str | None
) -> dict[str, bool]:
    """Each op through one MCP session; each must write exactly one decision row."""
    out = {}
    for op in ops:
        last = _last_audit(w.state)
        allowed = await _call(client, op)
        row = _one_decision(_audit_after(w.state, last), actor, "mcp", op.action)
        assert (row["outcome"] == "allowed") == allowed, (op, row)
        assert row["detail"].get("tool") == op.tool
        if role is not None:
            assert row["detail"]["role"] == role
        else:
            assert row["detail"].get("token", "").startswith("t-")
        out[op.name] = allowed
    return out


def _by_https(w: World, label: str, ops: list[Op]) -> dict[str, bool]:
    async def session() -> dict[str, bool]:
        async with mcp_client(w.url, w.tokens[label], w.sandbox.layout.tls_cert) as client:
            return await _session_ops(w, client, f"{label}@tokens.test", ops, None)

    return anyio.run(session)


def _stdio_params(config: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "carrier", "mcp", "--config", str(config)], env=_env()
    )


def _by_stdio(w: World, role: str, ops: list[Op]) -> dict[str, bool]:
    async def session() -> dict[str, bool]:
        async with Client(_stdio_params(w.configs[role])) as client:
            return await _session_ops(w, client, _local(), ops, role)

    return anyio.run(session)


def _local() -> str:
    import getpass

    return f"local:{getpass.getuser()}"


def _by_cli(w: World, role: str, op: Op) -> bool:
    last = _last_audit(w.state)
    done = _carrier(w.configs[role], *op.cli)
    allowed = done.returncode != 1 or "not allowed:" not in done.stderr + done.stdout
    if not allowed:
        assert done.stderr.count("\n") <= 2, done.stderr  # one line that says why
    row = _one_decision(_audit_after(w.state, last), _local(), "cli", op.action)
    assert (row["outcome"] == "allowed") == allowed, (done.stdout, done.stderr, row)
    assert row["detail"]["role"] == role
    return allowed


# --------------------------------------------------------------------------- the matrix


def test_every_door_decides_the_same(world: tuple[World, Any, Any]) -> None:
    w, _serve, people = world
    ops = _ops(token("m"))
    got: dict[tuple[str, str], dict[str, bool]] = {}
    # Signed mail: ops@ is an operator, newbie@ a web1-only operator, admin@ an admin.
    mail_people = (("ops", "operator", False), ("newbie", "webonly", False), ("admin", "admin", True))
    for who, _role, _admin in mail_people:
        got[("mail", who)] = {op.name: _by_mail(w, people, who, op) for op in ops}
    tokens = (
        ("operator", "operator", ()),
        ("webonly", "webonly", ()),
        ("viewer", "viewer", ()),
        ("mailscope", "operator", ("tools:mail",)),
    )
    for label, _role, _scopes in tokens:
        got[("https", label)] = _by_https(w, label, ops)
    # The local doors are the local user (a local admin) acting with mcp.stdio_role.
    for role in ("operator", "webonly", "viewer"):
        got[("stdio", role)] = _by_stdio(w, role, ops)
        got[("cli", role)] = {op.name: _by_cli(w, role, op) for op in ops}
    for op in ops:
        for who, role, admin in mail_people:
            assert got[("mail", who)][op.name] == expected(op.name, role, admin), ("mail", who, op.name)
        for label, role, scopes in tokens:
            assert got[("https", label)][op.name] == expected(op.name, role, False, scopes), (label, op.name)
        for role in ("operator", "webonly", "viewer"):
            for door in ("stdio", "cli"):
                assert got[(door, role)][op.name] == expected(op.name, role, True), (door, role, op.name)
    # Same role, same admin flag: the same answer whatever the door.
    assert got[("mail", "ops")] == got[("https", "operator")]
    assert got[("mail", "newbie")] == got[("https", "webonly")]
    assert got[("stdio", "operator")] == got[("cli", "operator")]
    assert got[("stdio", "viewer")] == got[("cli", "viewer")]
    # What ran is the same: the allowed exec on web1 ran once per allowed request, as the asker.
    marker = ops[1].mail.split()[-1]
    owners = [
        r[0]
        for r in db_rows(
            w.state, "SELECT owner FROM jobs WHERE kind = 'exec' AND spec LIKE ?", (f"%{marker}%",)
        )
    ]
    assert sorted(set(owners)) == sorted(
        {
            address("ops"),
            address("newbie"),
            address("admin"),
            "operator@tokens.test",
            "webonly@tokens.test",
            _local(),
        }
    )
    # `carrier audit` shows the decisions of every door.
    shown = _carrier(w.configs["operator"], "audit", "--limit", "5000").stdout
    for actor, door in (
        (address("ops"), "mail"),
        ("operator@tokens.test", "mcp"),
        (_local(), "mcp"),
        (_local(), "cli"),
    ):
        assert any(
            f" {door} " in line and actor in line and "decide:" in line for line in shown.splitlines()
        ), (actor, door)


# --------------------------------------------------------------------------- nothing skips the layer


#: Arguments for every operations tool (a job id of someone else's job is filled in).
TOOL_ARGS: dict[str, dict[str, Any]] = {
    "inventory_hosts": {},
    "playbook_list": {},
    "ssh_list": {},
    "nodes_list": {},
    "job_list": {},
    "playbook_run": {"playbook": "ping", "limit": "web1"},
    "ssh_exec": {"host_or_pattern": "web1", "command": "true"},
    "ssh_disconnect": {"host": "web1"},
    "job_start": {"host": "web1", "command": "true"},
    "job_status": {"job_id": "JOB"},
    "job_output": {"job_id": "JOB"},
    "job_input": {"job_id": "JOB", "text": "x"},
    "job_screen": {"job_id": "JOB"},
    "job_wait": {"job_id": "JOB", "timeout": 0},
    "job_kill": {"job_id": "JOB"},
    "schedule_list": {},
    "schedule_add": {"name": "matrix", "playbook": "ping", "limit": "web1", "cron": "@daily"},
    "schedule_remove": {"name": "matrix"},
}


def test_every_tool_and_verb_goes_through_the_operations_layer(world: tuple[World, Any, Any]) -> None:
    w, _serve, _people = world
    # Every verb of the mail grammar has its one ops call in the door's table, and nothing else.
    assert set(VERBS) == set(EXAMPLES) - {"job", "schedule"}
    someone_elses = db_rows(w.state, "SELECT id FROM jobs ORDER BY created_at LIMIT 1")
    job_id = someone_elses[0][0] if someone_elses else "j-aaaaaaaaaaaa"

    async def session() -> list[str]:
        async with mcp_client(w.url, w.tokens["viewer"], w.sandbox.layout.tls_cert) as client:
            tools = [t.name for t in (await client.list_tools()).tools]
            for name in tools:
                if name.startswith("mail_"):
                    args: dict[str, Any] = {}
                else:
                    assert name in TOOL_ARGS, f"tool {name} is not in the conformance table: add it"
                    args = {k: (job_id if v == "JOB" else v) for k, v in TOOL_ARGS[name].items()}
                last = _last_audit(w.state)
                await client.call_tool(name, args)
                rows = _audit_after(w.state, last)
                assert any(
                    r["action"].startswith("decide:")
                    and r["detail"].get("tool") == name
                    and r["actor"] == "viewer@tokens.test"
                    for r in rows
                ), f"{name} wrote no decision row: it does not go through the operations layer"
            return tools

    tools = anyio.run(session)
    assert {"ssh_exec", "job_start", "mail_send", "job_list"} <= set(tools)


#: Mail verbs with no MCP tool or CLI command (verb line, audit action): each is open to every
#: enrolled identity and writes its one decision row like any other operation.
MAIL_ONLY = (("settings", "settings"),)


def test_mail_only_verbs_decide_once(world: tuple[World, Any, Any]) -> None:
    w, _serve, people = world
    for who in ("ops", "newbie", "admin"):
        for line, action in MAIL_ONLY:
            assert _by_mail(w, people, who, Op(line, action, line, "", {}, ())), (who, line)
