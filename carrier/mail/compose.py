"""Outbound mail composition: pure functions from a draft to an ``EmailMessage`` (no I/O).

Every message carries Date (UTC), Message-ID ``<uuid4@sender-domain>`` (never the host name),
From ``Name <addr>``, To/Cc, Subject, MIME-Version and User-Agent ``carrier/<version>``, plus
In-Reply-To/References when it answers another. The body's shape picks the MIME structure:
text only → text/plain; text + HTML → multipart/alternative; attachments → multipart/mixed.
Output is 7-bit clean (non-ASCII headers RFC 2047, bodies quoted-printable or base64), so any
SMTP server takes it without SMTPUTF8 or 8BITMIME.
"""

from __future__ import annotations

import mimetypes
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses

from carrier import __version__
from carrier.errors import CarrierError
from carrier.mail.htmltext import html_to_text
from carrier.mail.records import Address

#: Generation policy: CRLF, 7-bit transfer encodings.
POLICY = SMTP.clone(cte_type="7bit")
USER_AGENT = f"carrier/{__version__}"
#: References kept in a reply: RFC 5322 allows trimming; keep the first id (the thread root) and the
#: most recent ones, which is what clients thread on.
MAX_REFERENCES = 40
_REPLY_PREFIX = re.compile(r"^\s*(re|aw|sv|antw|vs|r)\s*(\[\d+\])?\s*:", re.IGNORECASE)
_DOMAIN = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_MSGID = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")


class ComposeError(CarrierError):
    """A draft cannot become a message (bad address, header injection, missing recipient)."""


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    content: bytes
    mime_type: str = "application/octet-stream"


@dataclass(frozen=True)
class Draft:
    """What to send. Addresses are already validated :class:`Address` values (see ``parse_recipients``)."""

    sender: Address
    to: tuple[Address, ...]
    subject: str
    body: str
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    body_html: str | None = None
    attachments: tuple[OutgoingAttachment, ...] = ()
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    extra_headers: tuple[tuple[str, str], ...] = field(default=())


def _no_newlines(value: str, what: str) -> str:
    if any(ch in value for ch in "\r\n\x00"):
        raise ComposeError(f"{what} contains a line break or NUL: remove it (header injection is refused)")
    return value


def check_address(addr: str, what: str = "address") -> str:
    """``addr`` if it is one plain ``local@domain`` address, else ComposeError naming the problem."""
    addr = _no_newlines(addr.strip(), what)
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c in addr for c in ' <>,;"()[]\\'):
        raise ComposeError(f"{what} {addr!r} is not an email address: use local@domain")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ComposeError(f"{what} {addr!r} has an invalid domain") from None
    if not _DOMAIN.match(ascii_domain):
        raise ComposeError(f"{what} {addr!r} has an invalid domain")
    if not local.isascii():
        raise ComposeError(f"{what} {addr!r}: non-ASCII local parts (SMTPUTF8) are not supported")
    return f"{local}@{ascii_domain}"


def parse_recipients(values: str | Sequence[str] | None, what: str) -> tuple[Address, ...]:
    """Recipients given as ``"a@x, Name <b@y>"`` or a list of such strings, validated."""
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    out: list[Address] = []
    for item in items:
        if not isinstance(item, str):
            raise ComposeError(f"{what}: expected address strings, got {type(item).__name__}")
        _no_newlines(item, what)
        pairs = getaddresses([item])
        if not item.strip():
            continue
        if not pairs or any(not addr for _, addr in pairs):
            raise ComposeError(f"{what}: cannot read {item!r} as addresses: use 'Name <local@domain>'")
        for name, addr in pairs:
            if addr not in item:  # the parser "repaired" something (dropped a space, a quote...)
                raise ComposeError(f"{what}: cannot read {item!r} as addresses: use 'Name <local@domain>'")
            out.append(Address(name=name.strip(), addr=check_address(addr, what)))
    return tuple(out)


def sender_domain(addr: str) -> str:
    return addr.rpartition("@")[2].lower()


def new_message_id(sender_addr: str) -> str:
    """``<uuid4@domain-of-sender>``: unique, and never reveals the host name."""
    return f"<{uuid.uuid4()}@{sender_domain(sender_addr)}>"


def reply_subject(subject: str) -> str:
    """``Re: subject``, without doubling an existing Re:/AW:/SV: prefix."""
    subject = " ".join(subject.split())
    if _REPLY_PREFIX.match(subject):
        return subject
    return f"Re: {subject}" if subject else "Re:"


def reply_references(references: Sequence[str], in_reply_to: str | None, message_id: str) -> tuple[str, ...]:
    """References for a reply to a message: its References (or In-Reply-To), then its Message-ID."""
    chain = list(references) if references else ([in_reply_to] if in_reply_to else [])
    if message_id:
        chain.append(message_id)
    chain = list(dict.fromkeys(i for i in chain if i))
    if len(chain) > MAX_REFERENCES:
        chain = [chain[0], *chain[-(MAX_REFERENCES - 1) :]]
    return tuple(chain)


def check_message_id(value: str, what: str) -> str:
    value = value.strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    if not _MSGID.match(value):
        raise ComposeError(f"{what} {value!r} is not a Message-ID: expected <id@domain>")
    return value


def _header_address(address: Address) -> HeaderAddress:
    local, _, domain = address.addr.rpartition("@")
    return HeaderAddress(display_name=address.name, username=local, domain=domain)


def _maintype(mime_type: str, filename: str) -> tuple[str, str]:
    guessed = mime_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    main, _, sub = guessed.lower().partition("/")
    if not main or not sub or not re.fullmatch(r"[a-z0-9.+-]+", main + sub.replace("/", "")):
        return "application", "octet-stream"
    return main, sub


def compose(draft: Draft, *, now: datetime | None = None, message_id: str | None = None) -> EmailMessage:
    """The message for ``draft``; ComposeError when a header would be unsafe or recipients are missing."""
    if not (draft.to or draft.cc or draft.bcc):
        raise ComposeError("no recipients: give at least one address in to, cc or bcc")
    subject = _no_newlines(draft.subject, "subject")
    for address in (draft.sender, *draft.to, *draft.cc, *draft.bcc):
        _no_newlines(address.name, "a display name")
        check_address(address.addr)
    msg = EmailMessage(policy=POLICY)
    when = (now or datetime.now(UTC)).astimezone(UTC)
    msg["Date"] = format_datetime(when, usegmt=True)
    msg["Message-ID"] = message_id or new_message_id(draft.sender.addr)
    msg["From"] = _header_address(draft.sender)
    if draft.to:
        msg["To"] = [_header_address(a) for a in draft.to]
    if draft.cc:
        msg["Cc"] = [_header_address(a) for a in draft.cc]
    if draft.bcc:  # smtplib.send_message strips it from what goes out; the Sent copy keeps it
        msg["Bcc"] = [_header_address(a) for a in draft.bcc]
    msg["Subject"] = subject
    if draft.in_reply_to:
        msg["In-Reply-To"] = check_message_id(draft.in_reply_to, "in_reply_to")
    if draft.references:
        msg["References"] = " ".join(check_message_id(r, "references") for r in draft.references)
    msg["User-Agent"] = USER_AGENT
    for name, value in draft.extra_headers:
        msg[_no_newlines(name, "a header name")] = _no_newlines(value, f"header {name}")

    body = draft.body
    if not body.strip() and draft.body_html:
        body = html_to_text(draft.body_html)
    msg.set_content(body if body.endswith("\n") else body + "\n")  # sets MIME-Version too
    if draft.body_html:
        msg.add_alternative(draft.body_html, subtype="html")
    for attachment in draft.attachments:
        name = _no_newlines(attachment.filename, "an attachment file name")
        if not name or "/" in name or "\\" in name:
            raise ComposeError(f"attachment file name {name!r} must be a plain file name")
        main, sub = _maintype(attachment.mime_type, name)
        msg.add_attachment(attachment.content, maintype=main, subtype=sub, filename=name)
    return msg


def to_bytes(msg: EmailMessage) -> bytes:
    """The message as sent and as saved to Sent: CRLF line ends, 7-bit."""
    return msg.as_bytes(policy=POLICY)


def envelope_recipients(draft: Draft) -> list[str]:
    """Every address the message goes to (To, Cc, Bcc), once each, in order."""
    seen: dict[str, str] = {}
    for address in (*draft.to, *draft.cc, *draft.bcc):
        seen.setdefault(address.addr.lower(), address.addr)
    return list(seen.values())


def without(addresses: Iterable[Address], drop: Iterable[str]) -> tuple[Address, ...]:
    """``addresses`` minus those whose address is in ``drop`` (case-insensitive), de-duplicated."""
    dropped = {d.lower() for d in drop}
    out: dict[str, Address] = {}
    for address in addresses:
        key = address.addr.lower()
        if key not in dropped and key not in out:
            out[key] = address
    return tuple(out.values())
