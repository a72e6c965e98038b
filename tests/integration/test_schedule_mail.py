"""Schedules by signed mail through `carrier serve`: `schedule add|list|remove` are decided by the
same policy as the CLI and MCP (one audit row each), a refused line (bad cron, unknown playbook, a
role without schedules) is answered with its reason, and a mail with any refused line stores
nothing (a mail is one request)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from auth_support import primary_fingerprint
from door_support import Serve, db_rows, identities, send_signed, serving, text_of, wait_replies
from mail_support import token

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

ROLES = {
    "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "pty": True, "schedules": True},
    "viewer": {"playbooks": ["*"], "hosts": "all"},
}


@pytest.fixture
def served(sandbox: Sandbox) -> Iterator[tuple[Serve, Path]]:
    users = [{"email": address(name), "role": role,
              "fingerprint": primary_fingerprint(sandbox.layout.gnupg_home(name), address(name))}
             for name, role in (("ops", "operator"), ("newbie", "viewer"))]
    with serving(sandbox, roles=ROLES, users=users) as got:
        got[0].start()
        yield got


def schedules(state: Path) -> list[tuple[Any, ...]]:
    return db_rows(state, "SELECT name, owner, door, playbook, limit_pattern, cron, notify, extra_vars "
                          "FROM schedules ORDER BY name")


def ask(sandbox: Sandbox, people: dict[str, Any], who: str, text: str) -> str:
    """Mail ``text`` signed by ``who`` to carrier@ and return the text of Carrier's one reply."""
    tag = token("sched")
    # The tag below the signature separator keeps each signed text unique: the same text signed by
    # the same key in the same second is the same signature, which Carrier refuses as a replay.
    send_signed(sandbox, people[who], f"{text}\n-- \n{tag}\n", subject=f"schedules {tag}")
    (reply,) = wait_replies(sandbox, who, tag, 1)
    return text_of(reply)


def test_add_list_remove_by_signed_mail(sandbox: Sandbox, served: tuple[Serve, Path]) -> None:
    _serve, directory = served
    state = directory / "state"
    with identities(sandbox) as people:
        added = ask(sandbox, people, "ops",
                    'schedule add nightly disk_usage on web1 cron "0 3 * * *" notify always path=/var')
        assert "schedule nightly added: disk_usage on web1 at '0 3 * * *'; next run" in added, added
        assert "03:00:00 UTC" in added
        ((name, owner, door, playbook, limit, cron, notify, extra),) = schedules(state)
        assert (name, owner, door, playbook, limit, cron, notify) == (
            "nightly", address("ops"), "mail", "disk_usage", "web1", "0 3 * * *", "always")
        assert json.loads(extra) == {"path": "/var"}

        listed = ask(sandbox, people, "ops", "schedule list")
        assert "1 schedule(s)" in listed and "nightly" in listed and "owner " + address("ops") in listed

        removed = ask(sandbox, people, "ops", "schedule remove nightly")
        assert "schedule nightly removed" in removed, removed
        assert schedules(state) == []
        gone = ask(sandbox, people, "ops", "schedule remove nightly")
        assert "no schedule named 'nightly'" in gone, gone

    rows = db_rows(state, "SELECT action, actor, door, outcome FROM audit WHERE action LIKE 'schedule:%' "
                          "ORDER BY id")
    assert rows == [("schedule:add", address("ops"), "mail", "added"),
                    ("schedule:remove", address("ops"), "mail", "removed")]
    decided = db_rows(state, "SELECT outcome FROM audit WHERE action = 'decide:schedule' AND door = 'mail'")
    assert [o for (o,) in decided].count("allowed") >= 3  # add, list, remove
    assert ("denied",) in decided  # the second remove


def test_refusals_are_answered_and_a_mail_with_one_stores_nothing(
        sandbox: Sandbox, served: tuple[Serve, Path]) -> None:
    _serve, directory = served
    state = directory / "state"
    with identities(sandbox) as people:
        bad_cron = ask(sandbox, people, "ops", 'schedule add broken ping on web1 cron "0 25 * * *"')
        assert "invalid cron expression '0 25 * * *'" in bad_cron, bad_cron
        unknown = ask(sandbox, people, "ops", 'schedule add other nosuchbook cron "@daily"')
        assert "no playbook named 'nosuchbook'" in unknown, unknown
        no_cron = ask(sandbox, people, "ops", "schedule add other ping on web1")
        assert '`schedule add` needs `cron "<expression>"`' in no_cron, no_cron
        viewer = ask(sandbox, people, "newbie", 'schedule add mine ping on web1 cron "@daily"')
        assert "not allowed: role viewer may not use schedules" in viewer, viewer
        assert schedules(state) == []

        # One good line and one refused: nothing is stored, and the reply says why for each line.
        mixed = ask(sandbox, people, "ops",
                    'schedule add good ping on web1 cron "@daily"\n'
                    'schedule add bad ping on web1 cron "61 * * * *"')
        assert "invalid cron expression '61 * * * *'" in mixed, mixed
        assert "not run: this mail is one request, and line 2 was refused" in mixed, mixed
        assert schedules(state) == []
    assert db_rows(state, "SELECT count(*) FROM audit WHERE action = 'schedule:add'") == [(0,)]
