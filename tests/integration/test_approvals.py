"""Two-person approval by signed reply, through `carrier serve` on the sandbox.

A catalog entry with ``approval: {by: admin}`` makes a run wait: the requester's `run` is accepted as
``awaiting_approval``, the admins are mailed an approval request, and only a signed `approve <job>`
of an admin who is not the requester releases it. A self-approval, an approval by the wrong role and
an unsigned approval change nothing; `deny` ends it; nobody approving in time cancels it. The CLI's
`carrier run --wait` waits through the approval."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from auth_support import copy_home, expire_encryption_subkey, gpg
from door_support import (
    db_rows,
    identities,
    is_encrypted,
    opened,
    replies_for,
    send_signed,
    serving,
    text_of,
    wait_replies,
)
from mail_support import deliver, token

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

_JOB = re.compile(r"accepted, job (j-[a-z2-7]{12})")
REPO = Path(__file__).resolve().parents[2]


def _playbooks(directory: Path) -> Path:
    """The bundled playbooks, with service_restart open to operators behind an admin's approval
    (with a check-mode preview for the approvers), and `ping_gate`: ping behind an approval that
    expires after 10 s."""
    books = directory / "playbooks"
    shutil.copytree(REPO / "playbooks", books)
    meta = books / "service_restart.meta.yml"
    gated = "admin_only: false\napproval: {by: admin, count: 1, expires: 600, preview: true}"
    meta.write_text(meta.read_text().replace("admin_only: true", gated))
    shutil.copy(books / "ping.yml", books / "ping_gate.yml")
    (books / "ping_gate.meta.yml").write_text("description: ping, approved first\n"
                                              "approval: {by: admin, count: 1, expires: 10}\n")
    return books


def _reply(sandbox: Sandbox, who: str, tag: str, count: int, needle: str) -> str:
    replies = wait_replies(sandbox, who, tag, count, timeout=120)
    texts = [text_of(r) for r in replies]
    found = [t for t in texts if needle in t]
    assert found, f"no reply with {needle!r} among {len(texts)}: {texts[-1][:2000]}"
    return found[-1]


def _job(state: Path, job_id: str) -> dict[str, Any]:
    (row,) = db_rows(state, "SELECT status, started_at, message FROM jobs WHERE id = ?", (job_id,))
    held = db_rows(state, "SELECT state FROM approvals WHERE job_id = ?", (job_id,))
    return {"status": row[0], "started_at": row[1], "message": row[2],
            "approval": held[0][0] if held else None}


def _wait_status(state: Path, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(state, job_id)
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {_job(state, job_id)}")


def _unsigned(sandbox: Sandbox, sender: str, text: str, subject: str) -> None:
    message = EmailMessage()
    message["From"], message["To"] = address(sender), address("carrier")
    message["Subject"], message["Message-ID"] = subject, f"<{token('unsigned')}@example.test>"
    message.set_content(text)
    deliver(sandbox.layout, message, sender=address(sender), to=[address("carrier")])


def test_a_run_waits_for_another_persons_signed_approval(sandbox: Sandbox, tmp_path: Path) -> None:
    with serving(sandbox, playbook_dirs=[str(_playbooks(tmp_path))]) as (serve, directory), \
            identities(sandbox) as people:
        serve.start()
        state = directory / "state"
        ops, admin = people["ops"], people["admin"]
        tag = token("approval")
        # No such unit: the run (and its check-mode preview) fail on web1 and change nothing there.
        request = "run service_restart on web1 service=carrier-no-such-unit use_become=false"
        send_signed(sandbox, ops, request, tag)
        accepted = _reply(sandbox, "ops", tag, 1, "waits for approval")
        match = _JOB.search(accepted)
        assert match, accepted
        job_id = match.group(1)
        assert "role admin other than you" in accepted
        assert _job(state, job_id) == {"status": "queued", "started_at": None, "message": "",
                                       "approval": "pending"}

        # The admins are asked, in a mail that says what, who asked, and how to answer.
        (asked,) = wait_replies(sandbox, "admin", job_id, 1)
        asked_text = text_of(asked)
        assert "ops@example.test asks to run playbook service_restart on web1" in asked_text
        assert f"approve {job_id}" in asked_text and f"deny {job_id}" in asked_text
        # ... and what it would change: the same run in check mode, its recap for web1.
        assert "What it would change" in asked_text and "recap" in asked_text, asked_text
        previews = db_rows(state, "SELECT preview_job FROM approvals WHERE job_id = ?", (job_id,))
        (preview_id,) = previews[0]
        assert preview_id and preview_id in asked_text
        (spec,) = db_rows(state, "SELECT spec FROM jobs WHERE id = ?", (preview_id,))[0]
        assert json.loads(spec)["check"] is True and json.loads(spec)["diff"] is True
        assert not replies_for(sandbox, "ops", job_id)  # the requester is not an approver

        # The requester approving their own run: refused, nothing changes.
        send_signed(sandbox, ops, f"approve {job_id}", f"Re: {tag}")
        refused = _reply(sandbox, "ops", tag, 2, "not allowed")
        assert "nobody approves their own request" in refused
        # An unsigned approval from the admin's address: refused (no signature), nothing changes.
        other = token("unsigned-approve")
        _unsigned(sandbox, "admin", f"approve {job_id}", other)
        wait_replies(sandbox, "admin", other, 1)
        time.sleep(1)
        assert _job(state, job_id)["status"] == "queued" and _job(state, job_id)["approval"] == "pending"

        # The admin's signed approval releases it: it runs, and the requester gets the result.
        approve_tag = token("approve")
        send_signed(sandbox, admin, f"approve {job_id}", approve_tag)
        said = _reply(sandbox, "admin", approve_tag, 1, f"job {job_id} approved")
        assert "it runs now" in said
        done = _wait_status(state, job_id, ("succeeded", "failed"))
        assert done["started_at"] is not None and done["approval"] == "approved"
        _reply(sandbox, "ops", tag, 3, f"Job {job_id} ")

        # The chain records each decision; the approval carries the approver's signature digest.
        rows = db_rows(state, "SELECT actor, action, outcome, detail FROM audit WHERE target = ? "
                              "AND action = 'job:approve'", (job_id,))
        assert [(r[0], r[2]) for r in rows] == [("admin@example.test", "approved")]
        assert re.fullmatch(r"[0-9a-f]{64}", json.loads(rows[0][3])["signature"])
        denied = db_rows(state, "SELECT actor, detail FROM audit WHERE action = 'decide:approve' "
                                "AND outcome = 'denied'")
        assert any(actor == "ops@example.test" for actor, _ in denied), denied


def test_deny_ends_it_and_nobody_approving_in_time_cancels_it(sandbox: Sandbox, tmp_path: Path) -> None:
    with serving(sandbox, playbook_dirs=[str(_playbooks(tmp_path))]) as (serve, directory), \
            identities(sandbox) as people:
        serve.start()
        state = directory / "state"
        ops, admin = people["ops"], people["admin"]
        tag = token("denied")
        send_signed(sandbox, ops, "run ping_gate on web1", tag)
        job_id = _JOB.search(_reply(sandbox, "ops", tag, 1, "waits for approval"))
        assert job_id is not None
        denied_id = job_id.group(1)
        deny_tag = token("deny")
        send_signed(sandbox, admin, f"deny {denied_id} not during the freeze", deny_tag)
        _reply(sandbox, "admin", deny_tag, 1, f"job {denied_id} denied")
        ended = _wait_status(state, denied_id, ("cancelled",))
        assert ended["started_at"] is None and ended["approval"] == "denied"
        assert "denied by admin@example.test: not during the freeze" in ended["message"]
        _reply(sandbox, "ops", tag, 2, "not during the freeze")

        # The admin asks for it: the only admin may not approve it, so it expires unrun.
        tag = token("expires")
        send_signed(sandbox, admin, "run ping_gate on web1", tag)
        match = _JOB.search(_reply(sandbox, "admin", tag, 1, "waits for approval"))
        assert match is not None
        expiring = match.group(1)
        send_signed(sandbox, admin, f"approve {expiring}", f"Re: {tag}")
        assert "nobody approves their own request" in _reply(sandbox, "admin", tag, 2, "not allowed")
        ended = _wait_status(state, expiring, ("cancelled",), timeout=90)
        assert ended["started_at"] is None and ended["approval"] == "expired"
        assert "nobody approved it in time" in ended["message"]


def test_cli_run_waits_through_the_approval(sandbox: Sandbox, tmp_path: Path) -> None:
    """`carrier run --wait` as the local user: the admin is mailed, approves by signed mail, and the
    CLI's exit status is the run's."""
    with serving(sandbox, playbook_dirs=[str(_playbooks(tmp_path))]) as (serve, directory), \
            identities(sandbox) as people:
        serve.start()
        cli = subprocess.Popen(
            [sys.executable, "-m", "carrier", "run", "ping_gate", "--limit", "web2", "--wait",
             "--config", str(serve.config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
        try:
            deadline = time.monotonic() + 60
            asked: list[Any] = []
            while not asked and time.monotonic() < deadline:
                asked = [m for m in replies_for(sandbox, "admin", "Approval needed")
                         if "ping_gate on web2" in str(m["Subject"])]
                time.sleep(0.2)
            assert asked, "the admin was never asked"
            match = re.search(r"\(job (j-[a-z2-7]{12})\)", str(asked[-1]["Subject"]))
            assert match is not None
            time.sleep(2)  # time enough for a ping to have run, were it not held
            assert cli.poll() is None  # still waiting
            held = _job(directory / "state", match.group(1))
            assert held["status"] == "queued" and held["started_at"] is None and held["approval"] == "pending"
            send_signed(sandbox, people["admin"], f"approve {match.group(1)}", token("cli-approve"))
            out, err = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert cli.returncode == 0, out + err
        assert "succeeded" in out + err


def test_an_approver_with_encrypt_on_gets_the_request_encrypted(sandbox: Sandbox, tmp_path: Path) -> None:
    """The approval request follows the approver's own `settings encrypt`: encrypted to their key, its
    subject naming only the job; they decrypt it with their own gpg and approve as usual."""
    with serving(sandbox, playbook_dirs=[str(_playbooks(tmp_path))]) as (serve, directory), \
            identities(sandbox) as people:
        serve.start()
        state = directory / "state"
        ops, admin = people["ops"], people["admin"]
        on_tag = token("admin-encrypt-on")
        send_signed(sandbox, admin, "settings encrypt on", on_tag)
        (on,) = wait_replies(sandbox, "admin", on_tag, 1, timeout=120)
        assert is_encrypted(on)

        tag = token("encrypted-approval")
        send_signed(sandbox, ops, "run ping_gate on web2", tag)
        match = _JOB.search(_reply(sandbox, "ops", tag, 1, "waits for approval"))
        assert match is not None
        job_id = match.group(1)
        (asked,) = wait_replies(sandbox, "admin", job_id, 1, timeout=120)
        assert is_encrypted(asked) and str(asked["Subject"]) == f"Approval needed: job {job_id}"
        raw = asked.as_bytes()
        assert b"ping_gate" not in raw and b"web2" not in raw  # nothing of the run in clear
        inside = text_of(opened(admin, asked))
        assert "ops@example.test asks to run playbook ping_gate on web2" in inside, inside
        assert f"approve {job_id}" in inside

        approve_tag = token("approve-encrypted")
        send_signed(sandbox, admin, f"approve {job_id}", approve_tag)
        (said,) = wait_replies(sandbox, "admin", approve_tag, 1, timeout=120)
        assert f"job {job_id} approved" in text_of(opened(admin, said))
        done = _wait_status(state, job_id, ("succeeded", "failed"))
        assert done["approval"] == "approved" and done["status"] == "succeeded"


def test_an_approver_whose_key_cannot_encrypt_gets_the_request_withheld(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """`encrypt on` but the approver's encryption subkey expired since: the request goes signed only
    and withholds what would run (job id and how to answer only); the approval still works."""
    scratch = Path(tempfile.mkdtemp(prefix="capw-", dir="/var/tmp"))
    home = copy_home(sandbox.layout.gnupg_home("carrier"), scratch)
    try:
        with serving(sandbox, playbook_dirs=[str(_playbooks(tmp_path))], gnupg_home=str(home)) as \
                (serve, directory), identities(sandbox) as people:
            serve.start()
            ops, admin = people["ops"], people["admin"]
            on_tag = token("admin-on")
            send_signed(sandbox, admin, "settings encrypt on", on_tag)
            assert is_encrypted(wait_replies(sandbox, "admin", on_tag, 1, timeout=120)[0])
            assert serve.stop() == 0
            gpg(home, "--import", data=expire_encryption_subkey(admin, scratch))
            serve.start()

            tag = token("withheld-approval")
            send_signed(sandbox, ops, "run ping_gate on web2", tag)
            match = _JOB.search(_reply(sandbox, "ops", tag, 1, "waits for approval"))
            assert match is not None
            job_id = match.group(1)
            (asked,) = wait_replies(sandbox, "admin", job_id, 1, timeout=120)
            assert not is_encrypted(asked) and str(asked["Subject"]) == f"Approval needed: job {job_id}"
            text = text_of(asked)
            assert "its content is withheld" in text and f"approve {job_id}" in text, text
            assert "ping_gate" not in text and "web2" not in text and "ops@example.test" not in text

            approve_tag = token("approve-withheld")
            send_signed(sandbox, admin, f"approve {job_id}", approve_tag)
            wait_replies(sandbox, "admin", approve_tag, 1, timeout=120)
            done = _wait_status(directory / "state", job_id, ("succeeded", "failed"))
            assert done["approval"] == "approved" and done["status"] == "succeeded"
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                       check=False, timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
