"""Reply mails of the email door: bodies from Jinja2 templates, threaded, signed by Carrier's key.

Rendering is pure (``render_sections``, ``render_result``): text plus an HTML part; a job's result
has a per-host recap table coloured by outcome, the failed tasks' messages, the job id and its
duration, and the output (the full log as an attachment when it is longer than the body limit).
Everything shown passes through ``carrier.log.redact`` so a registered secret (a mail password,
an API key) never leaves in a reply. ``build_reply`` makes the signed (or encrypted) message:
same thread (In-Reply-To, References, ``Re:`` once), ``Auto-Submitted: auto-replied`` so other
robots do not answer it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from carrier.auth.keyring import Keyring
from carrier.auth.pgp import encrypted_message, signed_message
from carrier.config import MailAccount, MailSettings
from carrier.jobs.manager import JobView
from carrier.jobs.render import event_text
from carrier.log import redact
from carrier.mail.compose import (
    SMTP_POLICY,
    ComposeError,
    Draft,
    OutgoingAttachment,
    check_address,
    check_attachment_name,
    check_headers,
    check_message_id,
    compose,
    new_message_id,
    reply_references,
    reply_subject,
)
from carrier.mail.parse import Headers
from carrier.mail.records import Address
from carrier.store import EventRecord

#: Characters of output shown in a result body; beyond it the body shows the tail and attaches all.
TAIL_LINES = 60
_TEMPLATES = Path(__file__).parent / "templates"
_ENV = Environment(
    loader=FileSystemLoader(_TEMPLATES),
    autoescape=select_autoescape(["html.j2"]),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)
_COLOURS = {"ok": "#e6f4ea", "changed": "#fff4d6", "failed": "#fbe3e4", "unreachable": "#f3d4f5"}
_STATUS_COLOURS = {"succeeded": "#137333", "failed": "#b00020", "cancelled": "#8a6d00", "lost": "#8a6d00"}
_ENVELOPE = (
    "date",
    "message-id",
    "from",
    "to",
    "cc",
    "subject",
    "in-reply-to",
    "references",
    "user-agent",
    "auto-submitted",
)


@dataclass(frozen=True, slots=True)
class Section:
    """What one command (or one refusal) says in the immediate reply."""

    line: str
    status: str  # ok | accepted | error | denied
    text: str
    example: str | None = None
    block: str | None = None  # fixed-width text (a listing, a PTY screen)
    job: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Section:
        def opt(name: str) -> str | None:
            value = data.get(name)
            return None if value is None else str(value)

        return cls(str(data.get("line") or ""), str(data.get("status") or "ok"), str(data.get("text") or ""),
                   opt("example"), opt("block"), opt("job"))


@dataclass(frozen=True, slots=True)
class ReplyBody:
    text: str
    html: str
    attachments: tuple[OutgoingAttachment, ...] = ()


def _clean(value: str | None) -> str | None:
    return None if value is None else redact(value)


def render_sections(sections: Sequence[Section], *, footer: str = "") -> ReplyBody:
    """The immediate answer to a command mail: one block per command, in order."""
    items = [
        {**s.to_dict(), "text": redact(s.text), "block": _clean(s.block), "line": redact(s.line)}
        for s in sections
    ]
    ctx = {"sections": items, "footer": footer}
    return ReplyBody(
        _ENV.get_template("reply.txt.j2").render(ctx), _ENV.get_template("reply.html.j2").render(ctx)
    )


def recap_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per host from the play recap, with the colour of its worst outcome."""
    recap = summary.get("recap")
    if not isinstance(recap, Mapping):
        return []
    rows = []
    for host, counts in sorted(recap.items()):
        c = counts if isinstance(counts, Mapping) else {}
        row = {
            "host": str(host),
            "ok": int(c.get("ok", 0)),
            "changed": int(c.get("changed", 0)),
            "failed": int(c.get("failures", 0)),
            "unreachable": int(c.get("dark", 0)),
            "skipped": int(c.get("skipped", 0)),
        }
        worst = (
            "unreachable"
            if row["unreachable"]
            else "failed"
            if row["failed"]
            else "changed"
            if row["changed"]
            else "ok"
        )
        row["colour"] = _COLOURS[worst]
        rows.append(row)
    return rows


def failed_tasks(events: Sequence[EventRecord]) -> list[dict[str, str]]:
    out = []
    for event in events:
        if event.type in ("ansible.runner_on_failed", "ansible.runner_on_unreachable"):
            if event.data.get("ignore_errors"):
                continue
            res = event.data.get("res")
            msg = str(res.get("msg") or res.get("stderr") or "") if isinstance(res, Mapping) else ""
            out.append(
                {
                    "host": str(event.data.get("host", "?")),
                    "task": str(event.data.get("task") or "task"),
                    "msg": redact(" ".join(msg.split())[:500]),
                }
            )
        elif event.type == "exec.result" and event.data.get("status") not in ("ok", "succeeded"):
            out.append(
                {
                    "host": str(event.data.get("host", "?")),
                    "task": "exec",
                    "msg": redact(f"rc {event.data.get('rc')}: {str(event.data.get('stderr') or '')[:300]}"),
                }
            )
    return out


def job_log(events: Sequence[EventRecord]) -> str:
    """The job's output as a terminal shows it."""
    return "\n".join(t for t in (event_text(e) for e in events) if t)


def duration_text(view: JobView, now: float | None = None) -> str:
    if view.started_at is None:
        return "not started"
    end = view.finished_at or now or view.started_at
    seconds = max(0.0, end - view.started_at)
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _what(view: JobView) -> str:
    spec = view.spec
    if view.kind == "playbook":
        return f"playbook {spec.get('playbook')} on {spec.get('limit') or view.target}"
    if view.kind == "exec":
        command = spec.get("command")
        shown = " ".join(command) if isinstance(command, list) else str(command)
        return f"exec on {view.target}: {shown}"
    return f"{view.kind} on {view.target}"


def render_result(
    view: JobView,
    events: Sequence[EventRecord],
    *,
    body_limit: int = MailSettings.body_limit,
    screen: str | None = None,
    now: float | None = None,
) -> ReplyBody:
    """A job's result (or progress, while it runs) as text + HTML, the full log attached when long."""
    full = redact(job_log(events))
    attachments: tuple[OutgoingAttachment, ...] = ()
    output, truncated = full, False
    if len(full) > body_limit:
        truncated = True
        output = "\n".join(full.splitlines()[-TAIL_LINES:])[-body_limit:]
        attachments = (OutgoingAttachment(f"{view.id}.log", full.encode("utf-8"), "text/plain"),)
    ctx = {
        "job": view,
        "what": redact(_what(view)),
        "duration": duration_text(view, now),
        "recap": recap_rows(view.summary),
        "failures": failed_tasks(events),
        "output": output,
        "truncated": truncated,
        "output_lines": TAIL_LINES,
        "screen": _clean(screen),
        "colour": _STATUS_COLOURS.get(view.status, "#333333"),
    }
    text = _ENV.get_template("result.txt.j2").render(ctx)
    html = _ENV.get_template("result.html.j2").render(ctx)
    return ReplyBody(redact(text), redact(html), attachments)


# --------------------------------------------------------------------------- the message


@dataclass(frozen=True, slots=True)
class Thread:
    """Where a reply goes: the sender, the subject with ``Re:`` once, and the thread's ids."""

    to: str
    subject: str
    in_reply_to: str | None
    references: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "subject": self.subject,
            "in_reply_to": self.in_reply_to,
            "references": list(self.references),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thread:
        return cls(
            str(data["to"]),
            str(data["subject"]),
            data.get("in_reply_to"),
            tuple(str(r) for r in data.get("references") or ()),
        )


def thread_of(headers: Headers, to: str) -> Thread:
    """A reply to the mail with ``headers``, going to ``to`` (the authenticated sender)."""
    refs = reply_references(headers.references, headers.in_reply_to, headers.message_id)
    safe = tuple(r for r in refs if _safe_id(r))
    in_reply_to = headers.message_id if _safe_id(headers.message_id) else None
    # Read once already: an encoded word left in the subject was nested by the sender, and would
    # be decoded again when the reply is written. Break its "=?" so it stays text.
    subject = " ".join(redact(headers.subject).split())[:200].replace("=?", "= ?")
    return Thread(to, reply_subject(subject), in_reply_to, safe)


def _safe_id(value: str | None) -> bool:
    """A Message-ID compose will write as is (printable ASCII, no encoded words, ``<id@domain>``)."""
    if not value or len(value) > 250 or not all(32 < ord(c) < 127 for c in value):
        return False
    try:
        check_message_id(value, "reference")
    except ComposeError:
        return False
    return True


def body_entity(body: ReplyBody) -> EmailMessage:
    """The MIME body to sign: text, HTML alternative, attachments; 7-bit (QP/base64).

    Written with compose's header-safe policy and checked like a composed message.
    """
    part = EmailMessage(policy=SMTP_POLICY)
    text = body.text if body.text.endswith("\n") else body.text + "\n"
    part.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    if body.html:
        part.add_alternative(body.html, subtype="html", charset="utf-8", cte="quoted-printable")
    for attachment in body.attachments:
        main, _, sub = attachment.mime_type.partition("/")
        part.add_attachment(
            attachment.content,
            maintype=main or "application",
            subtype=sub or "octet-stream",
            filename=check_attachment_name(attachment.filename),
        )
    del part["MIME-Version"]
    check_headers(part)
    return part


def build_reply(
    keyring: Keyring,
    signer: str,
    account: MailAccount,
    thread: Thread,
    body: ReplyBody,
    *,
    message_id: str | None = None,
    encrypt_to: str | None = None,
    subject: str | None = None,
    now: datetime | None = None,
) -> tuple[str, bytes]:
    """(Message-ID, raw bytes) of a reply signed by ``signer`` (encrypted to ``encrypt_to`` when given)."""
    draft = Draft(
        sender=Address(name=account.display_name, addr=account.address),
        to=(Address(name="", addr=check_address(thread.to, "reply recipient")),),
        subject=subject if subject is not None else thread.subject,
        body=".",
        in_reply_to=thread.in_reply_to,
        references=thread.references,
        extra_headers=(("Auto-Submitted", "auto-replied"),),
    )
    msg_id = message_id or new_message_id(account.address)
    envelope = compose(draft, now=now or datetime.now(UTC), message_id=msg_id)
    headers = [(name, str(value)) for name, value in envelope.items() if name.lower() in _ENVELOPE]
    entity = body_entity(body)
    if encrypt_to:
        raw = encrypted_message(keyring, entity, headers, encrypt_to, signer=signer)
    else:
        raw = signed_message(keyring, entity, headers, signer)
    return msg_id, raw
