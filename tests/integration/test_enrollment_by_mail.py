"""Enrollment end to end by mail: newbie@ enrolls through a real `carrier serve` (challenge, signed
confirm, admin@'s signed approve), then runs a playbook on a sandbox host.

`serving()` gives Carrier a private state directory, so newbie@ is enrolled only there: the
session's sandbox (and the tests that expect newbie@ not to be enrolled) is left as it was."""

from __future__ import annotations

import email
import re
import subprocess
import sys
import time
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from auth_support import GpgUser, inline_mail
from door_support import (
    db_rows,
    identities,
    local_door,
    replies_for,
    send_signed,
    serving,
    store_key,
    text_of,
    wait_replies,
)
from mail_support import deliver, simple_message, token

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox

NEWBIE = address("newbie")


def wait_handled(sandbox: Sandbox, state: Path, message_id: str, timeout: float = 60) -> tuple[Any, ...]:
    """(state, error) of a mail once Carrier has finished with it."""
    key = store_key(sandbox, message_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db_rows(state, "SELECT state, error FROM messages WHERE message_id = ?", (key,))
        if rows and rows[0][0] in ("done", "failed"):
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"{message_id} not handled in {timeout} s")


def decrypted_text(user: GpgUser, message: Message) -> str:
    """The text of a reply encrypted to ``user`` (PGP/MIME), decrypted with the user's GnuPG home."""
    assert message.get_content_type() == "multipart/encrypted", message.get_content_type()
    (armored,) = [p for p in message.walk() if p.get_content_type() == "application/octet-stream"]
    payload = armored.get_payload(decode=True)
    assert isinstance(payload, bytes) and b"-----BEGIN PGP MESSAGE-----" in payload
    inner = email.message_from_bytes(user.decrypt(payload), policy=default_policy)
    return text_of(inner)


def newbie_enrollments(state: Path) -> list[tuple[Any, ...]]:
    return db_rows(state, "SELECT id, state, role FROM enrollments WHERE email = ?", (NEWBIE,))


def test_enroll_confirm_approve_and_run_by_mail(sandbox: Sandbox) -> None:
    with serving(sandbox) as (serve, directory), identities(sandbox) as people:
        state = directory / "state"
        newbie, admin, ops = people["newbie"], people["admin"], people["ops"]
        serve.start()
        assert newbie_enrollments(state) == []

        # Not enrolled yet: a signed run is recorded, never answered, and starts no job.
        early = token("early")
        early_id, _ = send_signed(sandbox, newbie, "run ping on web1\n", early)
        assert wait_handled(sandbox, state, early_id) == ("failed", "not enrolled")
        assert db_rows(state, "SELECT id FROM jobs") == []

        # 1. `enroll`, unsigned: the challenge comes back encrypted to the key on the keyserver.
        tag = token("enroll")
        deliver(
            sandbox.layout,
            simple_message(tag, "enroll\n", sender="newbie"),
            sender=NEWBIE,
            to=[address("carrier")],
        )
        (challenge,) = wait_replies(sandbox, "newbie", tag, 1)
        assert b"confirm " not in challenge.as_bytes()  # the nonce is only inside the encryption
        text = decrypted_text(newbie, challenge)
        assert f"enrollment request for {NEWBIE}" in text and newbie.fingerprint in text
        assert "(found: keyserver)" in text
        match = re.search(r"^confirm ([0-9a-f]{32})\r?$", text, re.M)
        assert match, text
        request = re.search(r"\((r-[a-z2-7]{12})\)", text)
        assert request, text
        request_id = request.group(1)
        assert newbie_enrollments(state) == [(request_id, "challenged", None)]

        # 2. The signed confirm: newbie is thanked, every admin gets the approval request.
        send_signed(sandbox, newbie, f"confirm {match.group(1)}\n", f"Re: {tag}")
        thanked = wait_replies(sandbox, "newbie", tag, 2)[1]
        assert f"request {request_id} is confirmed" in text_of(thanked)
        (ask,) = wait_replies(sandbox, "admin", request_id, 1)
        assert ask["Subject"] == f"Enrollment request {request_id} from {NEWBIE}"
        asked = text_of(ask)
        assert f"approve {request_id} as <role>" in asked and newbie.fingerprint in asked
        assert newbie_enrollments(state) == [(request_id, "verified", None)]

        # ops@ is enrolled but no admin: its signed approve decides nothing.
        not_admin = token("opsapprove")
        send_signed(sandbox, ops, f"approve {request_id} as admin\n", not_admin)
        (refusal,) = wait_replies(sandbox, "ops", not_admin, 1)
        assert "not allowed: only an admin may do this" in text_of(refusal)
        assert newbie_enrollments(state) == [(request_id, "verified", None)]

        # 3. admin@'s signed approve: admin@ gets the answer, newbie@ the notice.
        notices_before = len(replies_for(sandbox, "newbie", "Carrier enrollment approved"))
        decide = token("approve")
        send_signed(sandbox, admin, f"approve {request_id} as operator\n", f"Re: {decide}")
        (approved,) = wait_replies(sandbox, "admin", decide, 1)
        assert f"Approved {request_id}: {NEWBIE} is enrolled as operator" in text_of(approved)
        notices = wait_replies(sandbox, "newbie", "Carrier enrollment approved", notices_before + 1)
        told = text_of(notices[-1])
        assert f"enrolled in Carrier as {NEWBIE} with role operator" in told and newbie.fingerprint in told
        assert newbie_enrollments(state) == [(request_id, "approved", "operator")]

        # A second approve of the same request is answered and enrolls nobody again.
        again = token("again")
        send_signed(sandbox, admin, f"approve {request_id} as admin\n", again)
        (repeated,) = wait_replies(sandbox, "admin", again, 1)
        assert f"Request {request_id} is already approved (role operator" in text_of(repeated)
        assert newbie_enrollments(state) == [(request_id, "approved", "operator")]
        sent_notices = db_rows(
            state,
            "SELECT id FROM outbox WHERE recipients LIKE ? AND instr(raw, CAST(? AS BLOB)) > 0",
            (f"%{NEWBIE}%", "Subject: Carrier enrollment approved"),
        )
        assert len(sent_notices) == 1

        # 4. Enrolled: newbie@'s signed run is accepted and really runs on web1.
        run = token("run")
        run_id, _ = send_signed(sandbox, newbie, "run ping on web1\njobs\n", run)
        accepted, result = wait_replies(sandbox, "newbie", run, 2)
        first = text_of(accepted)
        assert "accepted, job j-" in first and f"{NEWBIE} (operator)" in first
        job_id = first.split("accepted, job ")[1].split(":")[0]
        body = text_of(result)
        assert f"Job {job_id} succeeded" in body and "web1" in body
        assert db_rows(state, "SELECT id, owner, target, status FROM jobs") == [
            (job_id, NEWBIE, "web1", "succeeded")
        ]
        assert wait_handled(sandbox, state, run_id) == ("done", None)

        # The local admin's revoke ends it: the next signed mail runs nothing.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "carrier",
                "enroll",
                "revoke",
                newbie.fingerprint,
                "--config",
                str(serve.config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"Revoked {newbie.fingerprint} ({NEWBIE})" in done.stdout
        assert newbie_enrollments(state) == [(request_id, "revoked", "operator")]
        late = token("late")
        late_id, _ = send_signed(sandbox, newbie, "run ping on web1\n", late)
        assert wait_handled(sandbox, state, late_id)[0] == "failed"
        assert len(db_rows(state, "SELECT id FROM jobs")) == 1
        assert serve.stop() == 0


def test_clear_signed_confirm_is_taken_like_a_pgp_mime_one(sandbox: Sandbox) -> None:
    """The challenge says "PGP/MIME or clear-signed": a clear-signed confirm from the not yet
    enrolled sender must reach the challenge, not be dropped as mail from a stranger."""
    with local_door(sandbox) as door, identities(sandbox) as people:
        newbie = people["newbie"]
        enroll = simple_message(token("enroll"), "enroll\n", sender="newbie").as_bytes()
        assert door.handle(enroll) == "enrollment: challenged"
        (challenge,) = door.replies()
        match = re.search(r"^confirm ([0-9a-f]{32})\r?$", decrypted_text(newbie, challenge), re.M)
        assert match
        confirm = inline_mail(newbie, f"confirm {match.group(1)}\n")
        assert door.handle(confirm) == "enrollment: verified"
        (record,) = door.store.find_enrollments(email=NEWBIE)
        assert record.state == "verified"
        thanked = [m for m in door.replies() if m["To"] == NEWBIE][-1]
        assert f"request {record.id} is confirmed" in text_of(thanked)
        asked = [m for m in door.replies() if m["To"] == address("admin")]
        assert [m["Subject"] for m in asked] == [f"Enrollment request {record.id} from {NEWBIE}"]
