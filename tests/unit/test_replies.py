"""Reply rendering (carrier.mail.replies): templates, recap table, log attachment, threading, redaction."""

from __future__ import annotations

import email.policy
from typing import Any

from carrier.jobs.manager import JobView
from carrier.log import add_secret
from carrier.mail.parse import parse_headers
from carrier.mail.replies import Section, body_entity, render_result, render_sections, thread_of
from carrier.store import EventRecord


def view(**over: Any) -> JobView:
    base: dict[str, Any] = dict(
        id="j-abcdefgh",
        kind="playbook",
        owner="ops@example.test",
        door="mail",
        target="web",
        status="failed",
        reason="task_failed",
        message="failed: web2 failures=1",
        rc=2,
        hosts=("web1", "web2"),
        spec={"playbook": "service_restart", "limit": "web"},
        summary={"recap": {"web1": {"ok": 2, "changed": 1}, "web2": {"ok": 1, "failures": 1}}},
        created_at=100.0,
        started_at=100.0,
        finished_at=112.5,
        cursor=3,
    )
    base.update(over)
    return JobView(**base)


def ev(seq: int, type_: str, **data: Any) -> EventRecord:
    return EventRecord("j-abcdefgh", seq, 100.0 + seq, type_, data)


def test_result_has_recap_failed_tasks_job_and_duration() -> None:
    events = [
        ev(1, "ansible.runner_on_ok", host="web1", task="restart", stdout="ok: [web1]"),
        ev(
            2,
            "ansible.runner_on_failed",
            host="web2",
            task="restart",
            res={"msg": "Unable to restart service nginx"},
            stdout="fatal: [web2]",
        ),
    ]
    body = render_result(view(), events)
    assert "Job j-abcdefgh failed (task_failed)" in body.text
    assert "Duration: 12.5 s" in body.text and "rc 2" in body.text
    assert "web2: restart: Unable to restart service nginx" in body.text
    assert "<td>web2</td><td>1</td><td>0</td><td>1</td>" in body.html
    assert "#fbe3e4" in body.html and "#fff4d6" in body.html  # failed and changed rows coloured
    assert not body.attachments


def test_long_output_goes_to_an_attachment() -> None:
    events = [
        ev(i, "ansible.runner_on_ok", host="web1", stdout=f"line {i} " + "x" * 100) for i in range(1, 400)
    ]
    body = render_result(view(status="succeeded", reason="ok"), events, body_limit=5000)
    (attachment,) = body.attachments
    assert attachment.filename == "j-abcdefgh.log"
    assert b"line 1 " in attachment.content and b"line 399 " in attachment.content
    assert "line 399" in body.text and "line 1 x" not in body.text
    assert "full log is attached" in body.text


def test_sections_escape_html_and_keep_order() -> None:
    body = render_sections(
        [
            Section("run <b>", "error", "bad <script>", example="run ping on web1"),
            Section("hosts", "ok", "2 host(s)", block="web1\nweb2"),
        ]
    )
    assert body.text.index("> run <b>") < body.text.index("> hosts")
    assert "Example: run ping on web1" in body.text
    assert "<script>" not in body.html and "&lt;script&gt;" in body.html


def test_secrets_never_leave_in_a_reply() -> None:
    add_secret("hunter2-very-secret")
    body = render_sections([Section("exec web1 env", "ok", "done", block="PASS=hunter2-very-secret")])
    assert "hunter2-very-secret" not in body.text + body.html


def test_thread_keeps_references_and_one_re() -> None:
    raw = (
        b"From: ops@example.test\r\nSubject: Re: RE: deploy\r\nMessage-ID: <c@x>\r\n"
        b"In-Reply-To: <b@x>\r\nReferences: <a@x> <b@x>\r\n\r\n"
    )
    thread = thread_of(parse_headers(raw), "ops@example.test")
    assert thread.subject == "Re: RE: deploy"
    assert thread.in_reply_to == "<c@x>"
    assert thread.references == ("<a@x>", "<b@x>", "<c@x>")
    fresh = thread_of(parse_headers(b"From: a@x\r\nSubject: deploy\r\nMessage-ID: <d@x>\r\n\r\n"), "a@x")
    assert fresh.subject == "Re: deploy" and fresh.references == ("<d@x>",)


def test_body_entity_is_7bit_multipart() -> None:
    body = render_result(view(), [])
    entity = body_entity(body)
    data = entity.as_bytes(policy=email.policy.SMTP)
    assert data.isascii()
    assert entity.get_content_type() == "multipart/alternative"
