"""The email door end to end: `carrier serve` against the sandbox, signed mail in over SMTP, a real
playbook on the sandbox hosts, the reply read from ops@'s inbox over IMAP."""

from __future__ import annotations

import time

from door_support import (
    db_rows,
    html_of,
    identities,
    send_signed,
    serving,
    store_key,
    text_of,
    wait_replies,
)
from mail_support import token

from carrier.sandbox.manager import Sandbox


def test_signed_run_gets_accepted_and_result_in_the_thread(sandbox: Sandbox) -> None:
    with serving(sandbox) as (serve, directory), identities(sandbox) as people:
        serve.start()
        tag = token("door")
        message_id, _ = send_signed(sandbox, people["ops"], "run ping on web1\njobs\n", f"Re: Re: {tag}")
        accepted, result = wait_replies(sandbox, "ops", tag, 2)
        for reply in (accepted, result):
            assert reply["In-Reply-To"] == message_id
            assert message_id in reply["References"]
            assert reply["Subject"] == f"Re: Re: {tag}"  # `Re:` never doubled
            assert reply["Auto-Submitted"] == "auto-replied"
            assert reply.get_content_type() == "multipart/signed"
            assert reply.get_param("protocol") == "application/pgp-signature"
        first = text_of(accepted)
        assert "accepted, job j-" in first and "> run ping on web1" in first and "> jobs" in first
        job_id = first.split("accepted, job ")[1].split(":")[0]
        body = text_of(result)
        assert f"Job {job_id} succeeded" in body
        assert "web1" in body and "Duration:" in body
        html = html_of(result)
        assert "<table" in html and "<td>web1</td>" in html and "#e6f4ea" in html  # ok row colour
        (state,) = db_rows(
            directory / "state", "SELECT state FROM messages WHERE message_id = ?",
            (store_key(sandbox, message_id),)
        )[0]
        assert state == "done"
        assert serve.stop() == 0
        assert any(line.get("msg") == "mail listener stopped" for line in serve.lines)


def test_sigkill_between_accept_and_reply_runs_once_and_replies_once(sandbox: Sandbox) -> None:
    with serving(sandbox) as (serve, directory), identities(sandbox) as people:
        state = directory / "state"
        serve.start()
        tag = token("kill")
        message_id, _ = send_signed(sandbox, people["ops"], "run ping on web2", tag)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the job exists: the mail was accepted, the reply may not be out
            if db_rows(state, "SELECT job_id FROM mail_steps"):  # the only mail of this state dir
                break
            time.sleep(0.005)
        serve.kill()
        serve.start()
        replies = wait_replies(sandbox, "ops", tag, 2, settle=3.0)
        assert len(replies) == 2, [r["Subject"] for r in replies]
        texts = [text_of(r) for r in replies]
        assert sum("accepted, job" in t for t in texts) == 1
        assert sum("succeeded" in t for t in texts) == 1
        jobs = db_rows(state, "SELECT id FROM jobs WHERE door = 'mail' AND target = 'web2'")
        assert len(jobs) == 1
        key = store_key(sandbox, message_id)
        assert db_rows(state, "SELECT state FROM messages WHERE message_id = ?", (key,)) == [("done",)]
