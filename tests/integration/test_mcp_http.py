"""The MCP door over streamable HTTP with TLS: a real MCP client session against a real uvicorn
server on loopback (the sandbox's certificate), tokens issued through the trust layer, and real jobs
on the sandbox hosts; then every way in that must be refused (401/403/429) before any tool runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp_http_support import (
    data_of,
    error_of,
    issue,
    load,
    mcp_client,
    revoke,
    running_door,
    tls_context,
    write_door_config,
)

from carrier.auth.service import Trust
from carrier.config import Config
from carrier.mcp.http import HttpDoor, HttpDoorError, start_http_door
from carrier.sandbox.manager import Sandbox
from carrier.store import Store

pytestmark = pytest.mark.sandbox

OPS_TOOLS = {
    "inventory_hosts",
    "playbook_list",
    "playbook_run",
    "ssh_exec",
    "ssh_list",
    "ssh_disconnect",
    "job_start",
    "job_status",
    "job_output",
    "job_input",
    "job_screen",
    "job_wait",
    "job_kill",
    "job_list",
}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def door_config(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Config:
    return load(write_door_config(sandbox, tmp_path_factory.mktemp("mcp-http"), port_shift=1))


@pytest.fixture(scope="module")
def door(door_config: Config) -> Iterator[HttpDoor]:
    with running_door(door_config) as running:
        yield running


def post(url: str, ca: Path, token: str | None, body: object = INIT) -> httpx2.Response:
    headers = dict(HEADERS)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx2.Client(verify=tls_context(ca), timeout=30) as http:
        return http.post(url, json=body, headers=headers)


def audit_rows(door: HttpDoor, action: str) -> list[dict[str, object]]:
    rows = door.services.store.list_audit(action=action, limit=500)
    return [{"actor": r.actor, "outcome": r.outcome, "target": r.target} for r in rows]


# --------------------------------------------------------------------------- the happy session


def test_session_runs_exec_playbook_and_reads_jobs(
    sandbox: Sandbox, door: HttpDoor, door_config: Config
) -> None:
    token, _ = issue(door, "ci@example.test", "operator")
    ca = sandbox.layout.tls_cert

    async def session() -> None:
        async with mcp_client(door.url, token, ca) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names >= OPS_TOOLS and "mail_send" in names

            hosts = data_of(await client.call_tool("inventory_hosts", {"pattern": "web"}))
            assert {h["name"] for h in hosts["hosts"]} == {"web1", "web2"}
            assert all("web" in h["groups"] for h in hosts["hosts"])

            ran = data_of(
                await client.call_tool("ssh_exec", {"host_or_pattern": "web1", "command": "uname -n"})
            )
            assert ran["status"] == "succeeded", ran
            [web1] = ran["hosts"]
            assert web1["host"] == "web1" and web1["rc"] == 0 and web1["stdout"].strip()
            assert web1["truncated"] is False

            books = data_of(await client.call_tool("playbook_list", {}))
            assert "ping" in {b["name"] for b in books["playbooks"]}

            run = data_of(
                await client.call_tool(
                    "playbook_run", {"playbook": "ping", "limit": "web1", "wait": True, "timeout": 300}
                )
            )
            assert run["status"] == "succeeded", run
            assert run["owner"] == "ci@example.test" and run["door"] == "mcp"
            assert run["hosts"] == ["web1"]

            status = data_of(await client.call_tool("job_status", {"job_id": run["job_id"]}))
            assert status["status"] == "succeeded" and status["done"] is True

            listed = data_of(await client.call_tool("job_list", {}))
            ids = [j["job_id"] for j in listed["jobs"]]
            assert run["job_id"] in ids and ran["job_id"] in ids
            assert all(j["owner"] == "ci@example.test" for j in listed["jobs"])

            # Read the playbook's events by cursor in small pages: nothing twice, nothing skipped.
            seqs: list[int] = []
            cursor, pages = 0, 0
            while True:
                page = data_of(
                    await client.call_tool(
                        "job_output", {"job_id": run["job_id"], "since": cursor, "max_bytes": 2048}
                    )
                )
                seqs += [e["seq"] for e in page["events"]]
                assert page["next_cursor"] >= cursor
                cursor, pages = page["next_cursor"], pages + 1
                if not page["more"]:
                    break
            assert pages > 1
            assert seqs == sorted(set(seqs)) and seqs[0] == 1
            assert seqs[-1] == status["cursor"]

    anyio.run(session)
    starts = audit_rows(door, "job:start")
    assert any(r["actor"] == "ci@example.test" for r in starts), starts


def test_token_from_cli_runs_with_scope_limits(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    """A token scoped to the run tools cannot read jobs; a host scope keeps ssh_exec off db1."""
    token, _ = issue(door, "scoped@example.test", "operator", scopes=("tools:run", "hosts:web1"))

    async def session() -> None:
        async with mcp_client(door.url, token, sandbox.layout.tls_cert) as client:
            denied = error_of(
                await client.call_tool("ssh_exec", {"host_or_pattern": "db1", "command": "true"})
            )
            assert "scope does not cover db1" in denied
            ok = data_of(await client.call_tool("ssh_exec", {"host_or_pattern": "web1", "command": "true"}))
            assert ok["status"] == "succeeded"
            read = error_of(await client.call_tool("job_status", {"job_id": ok["job_id"]}))
            assert "scope does not include jobs tools" in read

    anyio.run(session)


def test_viewer_cannot_exec_and_nothing_runs(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    token, _ = issue(door, "viewer@example.test", "viewer")

    async def session() -> None:
        async with mcp_client(door.url, token, sandbox.layout.tls_cert) as client:
            text = error_of(
                await client.call_tool("ssh_exec", {"host_or_pattern": "web1", "command": "touch /tmp/x"})
            )
            assert "not allowed: role viewer may not run commands" in text
            jobs = data_of(await client.call_tool("job_list", {}))
            assert jobs["jobs"] == []
            # The outside-the-role host and the unknown tool are refused the same way.
            other = error_of(await client.call_tool("playbook_run", {"playbook": "facts", "limit": "web1"}))
            assert "may not run playbook facts" in other
            unknown = await client.call_tool("no_such_tool", {})
            assert unknown.is_error
            wrong = await client.call_tool("ssh_exec", {"host_or_pattern": 5, "command": ["x"]})
            assert wrong.is_error

    anyio.run(session)
    denials = [r for r in audit_rows(door, "decide:exec") if r["actor"] == "viewer@example.test"]
    assert denials and all(r["outcome"] == "denied" for r in denials)


def test_job_of_another_user_is_refused(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    mine, _ = issue(door, "alice@example.test", "operator")
    theirs, _ = issue(door, "bob@example.test", "operator")

    async def session() -> None:
        async with mcp_client(door.url, mine, sandbox.layout.tls_cert) as alice:
            ran = data_of(await alice.call_tool("ssh_exec", {"host_or_pattern": "web2", "command": "true"}))
        async with mcp_client(door.url, theirs, sandbox.layout.tls_cert) as bob:
            for tool, args in (
                ("job_status", {}),
                ("job_output", {}),
                ("job_kill", {}),
                ("job_input", {"text": "x"}),
            ):
                text = error_of(await bob.call_tool(tool, {"job_id": ran["job_id"], **args}))
                assert "belongs to someone else" in text, (tool, text)

    anyio.run(session)


# --------------------------------------------------------------------------- refusals


def test_missing_wrong_expired_revoked_tokens_get_401(
    sandbox: Sandbox, door: HttpDoor, door_config: Config
) -> None:
    ca = sandbox.layout.tls_cert
    expired, _ = issue(door, "late@example.test", "operator", ttl=1)
    revoked, revoked_id = issue(door, "gone@example.test", "operator")
    assert post(door.url, ca, revoked).status_code == 200  # works before it is revoked
    revoke(door, revoked_id)
    time.sleep(1.2)  # let the 1 s token expire (not a timing assertion)
    wrong = "A" * 43
    for token in (None, wrong, "not even a token", expired, revoked):
        response = post(door.url, ca, token)
        assert response.status_code == 401, (token, response.text)
        assert response.headers["www-authenticate"].lower().startswith("bearer")
    reasons = {r["outcome"] for r in audit_rows(door, "http:admit")}
    assert {"malformed", "unknown", "expired", "revoked"} <= reasons


def test_big_body_and_malformed_jsonrpc(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    token, _ = issue(door, "big@example.test", "operator")
    ca = sandbox.layout.tls_cert
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    with httpx2.Client(verify=tls_context(ca), timeout=60) as http:
        big = http.post(door.url, content=b'{"x":"' + b"a" * (5 * 1024 * 1024) + b'"}', headers=headers)
        assert big.status_code == 413
        bad = http.post(door.url, content=b"{not json", headers=headers)
        assert bad.status_code == 400
        assert "error" in bad.json()


def test_ip_deny_refuses_even_a_valid_token(sandbox: Sandbox, tmp_path: Path) -> None:
    config = load(write_door_config(sandbox, tmp_path, port_shift=2, mcp={"ip_deny": ["127.0.0.0/8"]}))
    token, _ = issue(config, "ci@example.test", "operator")
    with running_door(config) as door:
        response = post(door.url, sandbox.layout.tls_cert, token)
        assert response.status_code == 403
        assert "www-authenticate" not in response.headers
    store = Store.open(config.state_dir)
    try:
        record = Trust(config, store).tokens.list_tokens("ci@example.test")[0]
        assert record.last_used_at is None  # the token was never even looked at
    finally:
        store.close()


def test_rate_limit_refuses_beyond_the_budget(sandbox: Sandbox, tmp_path: Path) -> None:
    config = load(
        write_door_config(
            sandbox, tmp_path, port_shift=3, extra={"limits": {"rate_limit": 4, "rate_limit_window": 3600}}
        )
    )
    token, _ = issue(config, "ci@example.test", "operator")
    with running_door(config) as door:
        codes = [post(door.url, sandbox.layout.tls_cert, token).status_code for _ in range(6)]
    assert codes[:4] == [200, 200, 200, 200]
    assert codes[4:] == [429, 429]


def test_plain_http_only_on_loopback_and_tls_needs_files(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = load(write_door_config(sandbox, tmp_path / "a", port_shift=4, mcp={"bind_host": "0.0.0.0"}))  # noqa: S104
    with pytest.raises(HttpDoorError, match="only allowed on a loopback"):
        start_http_door(outside, plain=True)
    missing = load(
        write_door_config(
            sandbox,
            tmp_path / "b",
            port_shift=4,
            mcp={"tls_cert": str(tmp_path / "nope.pem"), "tls_key": str(tmp_path / "nope.key")},
        )
    )
    with pytest.raises(HttpDoorError, match="carrier cert"):
        start_http_door(missing)


def test_pty_job_driven_to_completion(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    token, _ = issue(door, "pty@example.test", "operator")

    async def session() -> None:
        async with mcp_client(door.url, token, sandbox.layout.tls_cert) as client:
            job = data_of(
                await client.call_tool(
                    "job_start", {"host": "web1", "command": "cat", "cols": 80, "rows": 24}
                )
            )
            assert job["kind"] == "pty" and job["owner"] == "pty@example.test", job
            job_id = job["job_id"]
            sent = data_of(
                await client.call_tool(
                    "job_input", {"job_id": job_id, "text": "carrier-says-hi", "keys": ["Enter"]}
                )
            )
            assert sent["cursor"] >= 0
            waited = data_of(
                await client.call_tool(
                    "job_wait", {"job_id": job_id, "pattern": "carrier-says-hi", "timeout": 30}
                )
            )
            assert waited["wait"]["reason"] == "match", waited
            screen = data_of(await client.call_tool("job_screen", {"job_id": job_id}))
            assert "carrier-says-hi" in screen["screen"]["text"]
            assert screen["screen"]["cols"] == 80
            out = data_of(await client.call_tool("job_output", {"job_id": job_id, "since": 0}))
            assert "carrier-says-hi" in out["text"] and out["next_cursor"] > 0
            await client.call_tool("job_input", {"job_id": job_id, "keys": ["C-d"]})
            done = data_of(await client.call_tool("job_wait", {"job_id": job_id, "timeout": 60}))
            assert done["done"] is True and done["job"]["status"] == "succeeded", done
            after = error_of(await client.call_tool("job_input", {"job_id": job_id, "text": "x"}))
            assert "has ended" in after

    anyio.run(session)


def test_host_outside_the_role_and_stdio_identity(
    sandbox: Sandbox, door: HttpDoor, door_config: Config
) -> None:
    token, _ = issue(door, "web@example.test", "webonly")

    async def session() -> None:
        async with mcp_client(door.url, token, sandbox.layout.tls_cert) as client:
            text = error_of(await client.call_tool("ssh_exec", {"host_or_pattern": "all", "command": "true"}))
            assert "role webonly may not target db1, web2" in text
            listed = data_of(await client.call_tool("job_list", {}))
            assert listed["jobs"] == []  # nothing ran, not even on web1

    anyio.run(session)


def test_mail_tools_follow_role_and_scope(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    """An operator token reads mail over HTTPS; a viewer may only list folders; a run-scoped token
    gets no mail tools at all."""
    operator, _ = issue(door, "mail@example.test", "operator")
    viewer, _ = issue(door, "look@example.test", "viewer")
    run_only, _ = issue(door, "run@example.test", "operator", scopes=("tools:run",))

    async def session() -> None:
        ca = sandbox.layout.tls_cert
        async with mcp_client(door.url, operator, ca) as client:
            page = data_of(await client.call_tool("mail_inbox_list", {"limit": 5}))
            assert "messages" in page
        async with mcp_client(door.url, viewer, ca) as client:
            folders = data_of(await client.call_tool("mail_folder_list", {}))
            assert "INBOX" in {f["name"] for f in folders["folders"]}
            text = error_of(
                await client.call_tool("mail_send", {"to": "x@example.test", "subject": "s", "body": "b"})
            )
            assert "not allowed: role viewer may not use mail_send" in text
        async with mcp_client(door.url, run_only, ca) as client:
            text = error_of(await client.call_tool("mail_inbox_list", {}))
            assert "scope does not include mail tools" in text

    anyio.run(session)


def test_cli_issued_token_and_serve_style_door(sandbox: Sandbox, tmp_path: Path) -> None:
    """`carrier token issue` makes the token; the door runs on parts its host (carrier serve) owns,
    and stopping the door leaves those parts working."""
    import subprocess
    import sys

    from carrier.jobs.system import build_job_system

    path = write_door_config(sandbox, tmp_path, port_shift=12)
    issued = subprocess.run(
        [
            sys.executable,
            "-c",
            "from carrier.auth.cli import token; token()",
            "issue",
            "cli@example.test",
            "--role",
            "operator",
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    config = load(path)
    store = Store.open(config.state_dir)
    trust = Trust(config, store)
    jobs = build_job_system(config, store)
    jobs.manager.start()
    try:
        door = start_http_door(config, store=store, trust=trust, jobs=jobs)
        try:

            async def session() -> None:
                async with mcp_client(door.url, token, sandbox.layout.tls_cert) as client:
                    ran = data_of(
                        await client.call_tool("ssh_exec", {"host_or_pattern": "db1", "command": "id -un"})
                    )
                    assert ran["status"] == "succeeded" and ran["hosts"][0]["stdout"].strip() == "carrier-sbx"

            anyio.run(session)
        finally:
            door.stop()
        view = jobs.manager.run_exec("web1", ["true"], owner="after", door="cli")
        assert jobs.manager.wait(view.id, timeout=60).status == "succeeded"
        assert [j.owner for j in jobs.manager.list_jobs(kind="exec")][:2] == ["after", "cli@example.test"]
    finally:
        jobs.close()
        store.close()
