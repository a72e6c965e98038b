"""Schedules through the real doors: `carrier schedule` as a process, MCP over HTTPS with a token,
and `carrier serve` processes running them on the sandbox — each slot fires exactly once across a
restart and with two serve processes on one store, missed slots are reported not run, a schedule
runs as its owner through the policy (an owner who lost the role is refused, and that is audited),
and the owner gets the result mail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from auth_support import primary_fingerprint
from door_support import Serve, db_rows, html_of, serving, text_of, wait_replies
from mail_support import token, write_secret
from mcp_http_support import data_of, error_of, mcp_client
from ruamel.yaml import YAML

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox, dump_yaml

pytestmark = pytest.mark.sandbox

ROLES = {
    "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "pty": True, "schedules": True},
    "viewer": {"playbooks": [], "hosts": "all"},
    "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True},
}
EVERY_5S = "* * * * * */5"


def carrier(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``carrier schedule ARGS`` (or another command) as a process, ``--config`` after the subcommand."""
    split = 2 if args[0] in ("schedule", "token") else 1
    argv = [sys.executable, "-m", "carrier", *args[:split], "--config", str(config), *args[split:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ},
                          check=False)


def with_changes(config: Path, name: str, **changes: Any) -> Path:
    """The same configuration (same state directory) with top-level keys or mcp entries changed."""
    data = YAML(typ="safe").load(config.read_text())
    for key, value in changes.items():
        if key == "stdio_role":
            data["mcp"]["stdio_role"] = value
        else:
            data[key] = value
    path = config.with_name(name)
    write_secret(path, dump_yaml(data))
    return path


def runs(state: Path, schedule: str) -> list[dict[str, Any]]:
    rows = db_rows(state, "SELECT slot, state, job_id, claimed_by, reason, missed_count, first_missed "
                          "FROM schedule_runs WHERE schedule = ? ORDER BY slot", (schedule,))
    keys = ("slot", "state", "job_id", "claimed_by", "reason", "missed_count", "first_missed")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def audit(state: Path, action: str) -> list[dict[str, Any]]:
    rows = db_rows(state, "SELECT actor, door, outcome, detail FROM audit WHERE action = ? ORDER BY id",
                   (action,))
    return [{"actor": a, "door": d, "outcome": o, "detail": json.loads(x)} for a, d, o, x in rows]


def wait_runs(state: Path, schedule: str, count: int, *, what: str = "started", timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(r["state"] == what for r in runs(state, schedule)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} {what} slots of {schedule}: {runs(state, schedule)}")


@pytest.fixture
def served(sandbox: Sandbox) -> Iterator[tuple[Serve, Path]]:
    users = [{"email": address("ops"),
              "fingerprint": primary_fingerprint(sandbox.layout.gnupg_home("ops"), address("ops")),
              "role": "operator"}]
    with serving(sandbox, roles=ROLES, users=users, mcp={**_mcp(sandbox), "stdio_role": "operator"}) as got:
        yield got


def _mcp(sandbox: Sandbox) -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load(sandbox.layout.config_file.read_text())["mcp"]
    return data


# --------------------------------------------------------------------------- the CLI


def test_cli_adds_lists_and_removes_and_refuses_bad_input(served: tuple[Serve, Path]) -> None:
    serve, directory = served
    config = serve.config
    added = carrier(config, "schedule", "add", "nightly", "--playbook", "ping", "--limit", "web1",
                    "--cron", "0 3 * * *", "--notify", "always")
    assert added.returncode == 0, added.stderr
    assert "schedule nightly added: ping on web1 at '0 3 * * *'; next run" in added.stdout
    assert "03:00:00 UTC" in added.stdout
    listed = carrier(config, "schedule", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "nightly" and entry["playbook"] == "ping" and entry["limit"] == "web1"
    assert entry["owner"].startswith("local:") and entry["door"] == "cli" and entry["notify"] == "always"
    assert time.gmtime(entry["next_at"]).tm_hour == 3 and entry["next_at"] > time.time()

    bad = carrier(config, "schedule", "add", "broken", "--playbook", "ping", "--cron", "0 3 * *")
    assert bad.returncode == 1
    assert "carrier: error: invalid cron expression '0 3 * *': expected 5 fields" in bad.stderr
    range_bad = carrier(config, "schedule", "add", "broken", "--playbook", "ping", "--cron", "0 25 * * *")
    assert range_bad.returncode == 1 and "out of range" in range_bad.stderr
    taken = carrier(config, "schedule", "add", "nightly", "--playbook", "ping", "--cron", "@daily")
    assert taken.returncode == 1 and "a schedule named 'nightly' exists" in taken.stderr
    unknown = carrier(config, "schedule", "add", "other", "--playbook", "nosuchbook", "--cron", "@daily")
    assert unknown.returncode == 1 and "no playbook named 'nosuchbook'" in unknown.stderr
    viewer = with_changes(config, "viewer.yml", stdio_role="viewer")
    refused = carrier(viewer, "schedule", "add", "other", "--playbook", "ping", "--cron", "@daily")
    assert refused.returncode == 1 and "not allowed: role viewer may not run playbook ping" in refused.stderr
    listed = carrier(config, "schedule", "list", "--json")
    assert [r["name"] for r in json.loads(listed.stdout)] == ["nightly"]

    removed = carrier(config, "schedule", "remove", "nightly")
    assert removed.returncode == 0 and "schedule nightly removed" in removed.stdout
    again = carrier(config, "schedule", "remove", "nightly")
    assert again.returncode == 1 and "no schedule named 'nightly'" in again.stderr
    assert "no schedules" in carrier(config, "schedule", "list").stdout
    # Every one of those was decided and audited (bad input as a denied row with its reason).
    state = directory / "state"
    decided = audit(state, "decide:schedule")
    assert all(r["door"] == "cli" for r in decided)
    reasons = [r["detail"]["reason"] for r in decided if r["outcome"] == "denied"]
    assert any("invalid cron expression" in x for x in reasons)
    assert any("role viewer may not run playbook ping" in x for x in reasons)
    assert [r["outcome"] for r in audit(state, "schedule:add")] == ["added"]
    assert [r["outcome"] for r in audit(state, "schedule:remove")] == ["removed"]


# --------------------------------------------------------------------------- exactly once per slot


def test_each_slot_fires_once_across_restarts_and_two_serve_processes(served: tuple[Serve, Path]) -> None:
    serve, directory = served
    state = directory / "state"
    added = carrier(serve.config, "schedule", "add", "every5", "--playbook", "ping", "--limit", "web1",
                    "--cron", EVERY_5S, "--notify", "never")
    assert added.returncode == 0, added.stderr
    serve.start()
    wait_runs(state, "every5", 2)
    second = Serve(serve.config).start()  # a second `carrier serve` on the same store
    try:
        before = len(runs(state, "every5"))
        wait_runs(state, "every5", before + 2)
        serve.stop()  # a restart of the first while the second runs
        wait_runs(state, "every5", len(runs(state, "every5")) + 1)
        serve.start()
        wait_runs(state, "every5", len(runs(state, "every5")) + 2)
    finally:
        second.stop()
    serve.stop()
    # Both down for more than two slots, then one starts again: the slots in between are reported
    # (one row, logged), the newest fires if it is within the grace; none runs twice.
    time.sleep(12)
    serve.start()
    wait_runs(state, "every5", 1, what="missed")
    missed_log = serve.wait_log("schedule slots missed")
    wait_runs(state, "every5", len([r for r in runs(state, "every5") if r["state"] == "started"]) + 1)
    serve.stop()

    rows = runs(state, "every5")
    started = [r for r in rows if r["state"] == "started"]
    jobs = db_rows(state, "SELECT id, created_at, owner, door, spec FROM jobs ORDER BY created_at")
    # One job per started slot, no job without its slot, no slot with two jobs.
    assert sorted(r["job_id"] for r in started) == sorted(j[0] for j in jobs)
    assert len({r["job_id"] for r in started}) == len(started)
    # Each job was started for its own slot: at or after it, and before the next slot came.
    created = {j[0]: j[1] for j in jobs}
    for r in started:
        assert r["slot"] % 5 == 0
        assert r["slot"] <= created[r["job_id"]] < r["slot"] + 60
    assert len({r["claimed_by"] for r in started}) >= 2  # the slots were fired by different processes
    assert all(j[2].startswith("local:") and j[3] == "cli" for j in jobs)  # as the owner, by its door
    (gap,) = [r for r in rows if r["state"] == "missed"]
    assert gap["missed_count"] >= 1 and missed_log["schedule"] == "every5"
    assert not any(gap["first_missed"] <= r["slot"] <= gap["slot"] for r in started)
    # The runs did run (the last may still be running when serve stopped: it is adopted later).
    ended = db_rows(state, "SELECT DISTINCT status FROM jobs WHERE status NOT IN ('queued', 'running')")
    assert ended == [("succeeded",)], ended


# --------------------------------------------------------------------------- as the owner, through the policy


def test_an_owner_who_lost_the_role_is_refused_and_audited(served: tuple[Serve, Path]) -> None:
    serve, directory = served
    state = directory / "state"
    assert carrier(serve.config, "schedule", "add", "lost", "--playbook", "ping", "--limit", "web1",
                   "--cron", EVERY_5S).returncode == 0
    # The local user now acts as viewer (mcp.stdio_role), who may run no playbook.
    demoted = Serve(with_changes(serve.config, "demoted.yml", stdio_role="viewer")).start()
    try:
        wait_runs(state, "lost", 2, what="refused")
        demoted.wait_log("schedule refused")
    finally:
        demoted.stop()
    refused = [r for r in runs(state, "lost") if r["state"] == "refused"]
    assert all("not allowed: role viewer may not run playbook ping" in r["reason"] for r in refused)
    assert not any(r["state"] == "started" for r in runs(state, "lost"))
    assert db_rows(state, "SELECT count(*) FROM jobs") == [(0,)]
    denied = [r for r in audit(state, "decide:playbook") if r["detail"].get("tool") == "schedule:lost"]
    assert len(denied) >= 2 and all(r["outcome"] == "denied" for r in denied)
    assert denied[0]["actor"].startswith("local:") and denied[0]["detail"]["role"] == "viewer"


def test_a_mail_owner_gets_the_result_and_loses_the_schedule_with_the_role(
    served: tuple[Serve, Path], sandbox: Sandbox
) -> None:
    serve, directory = served
    state = directory / "state"
    issued = carrier(serve.config, "token", "issue", address("ops"), "--role", "operator", "--ttl", "3600")
    assert issued.returncode == 0, issued.stderr
    bearer = issued.stdout.strip()
    stranger = carrier(serve.config, "token", "issue", "stranger@tokens.test", "--role", "operator")
    assert stranger.returncode == 0, stranger.stderr
    serve.start()
    url = f"https://127.0.0.1:{_mcp(sandbox)['port']}/mcp"
    name = token("sch")

    async def add() -> tuple[dict[str, Any], str, dict[str, Any]]:
        async with mcp_client(url, bearer, sandbox.layout.tls_cert) as client:
            made = data_of(await client.call_tool("schedule_add", {
                "name": name, "playbook": "ping", "limit": "web1", "cron": EVERY_5S, "notify": "always"}))
            bad = error_of(await client.call_tool("schedule_add", {
                "name": "bad", "playbook": "ping", "cron": "61 * * * *"}))
            listed = data_of(await client.call_tool("schedule_list", {}))
        async with mcp_client(url, stranger.stdout.strip(), sandbox.layout.tls_cert) as client:
            # A token's owner who is not enrolled could never be run as: refused when adding.
            unenrolled = error_of(await client.call_tool("schedule_add", {
                "name": "stray", "playbook": "ping", "cron": "@daily"}))
            assert "stranger@tokens.test is not enrolled" in unenrolled
            return made, bad, listed

    made, bad, listed = anyio.run(add)
    assert made["owner"] == address("ops") and made["door"] == "mcp" and made["cron"] == EVERY_5S
    assert "invalid cron expression" in bad and "out of range" in bad
    assert [s["name"] for s in listed["schedules"]] == [name]
    (mail,) = wait_replies(sandbox, "ops", f"Carrier schedule {name}", 1)[:1]
    assert "succeeded" in str(mail["Subject"])
    assert "ping" in text_of(mail) and "web1" in text_of(mail)
    assert "<table" in html_of(mail) and "web1" in html_of(mail)  # the HTML recap
    serve.stop()

    # ops@ is now a viewer (carrier.yml), without schedules: the next slot is refused and audited.
    users = YAML(typ="safe").load(serve.config.read_text())["users"]
    users[0]["role"] = "viewer"
    time.sleep(12)  # down for more than two slots: the older ones are missed, reported to ops@
    demoted = Serve(with_changes(serve.config, "demoted.yml", users=users)).start()
    try:
        wait_runs(state, name, 1, what="refused")
        wait_runs(state, name, 1, what="missed")
        missed = wait_replies(sandbox, "ops", f"schedule {name}: missed runs", 1)[0]
        assert "Missed slots are reported, not run." in text_of(missed)
        refusal = wait_replies(sandbox, "ops", f"schedule {name}: refused", 1)[0]
        assert "role viewer may not use schedules" in text_of(refusal)
    finally:
        demoted.stop()
    refused = [r for r in runs(state, name) if r["state"] == "refused"]
    assert "not allowed: role viewer may not use schedules" in refused[0]["reason"]
    denied = [r for r in audit(state, "decide:schedule")
              if r["detail"].get("tool") == f"schedule:{name}" and r["outcome"] == "denied"]
    assert denied and denied[0]["actor"] == address("ops") and denied[0]["detail"]["role"] == "viewer"

    async def remove() -> tuple[dict[str, Any], dict[str, Any]]:
        async with mcp_client(url, bearer, sandbox.layout.tls_cert) as client:
            gone = data_of(await client.call_tool("schedule_remove", {"name": name}))
            return gone, data_of(await client.call_tool("schedule_list", {}))

    serve.start()
    gone, after = anyio.run(remove)
    assert gone == {"name": name, "removed": True} and after["schedules"] == []
