"""Outbound mail composition: pure functions from a draft to an ``EmailMessage`` (no I/O).

Every message carries Date (UTC), Message-ID ``<uuid4@sender-domain>`` (never the host name),
From ``Name <addr>``, To/Cc, Subject, MIME-Version and User-Agent ``carrier/<version>``, plus
In-Reply-To/References when it answers another. The body's shape picks the MIME structure:
text only → text/plain; text + HTML → multipart/alternative; attachments → multipart/mixed.
Output is 7-bit clean (non-ASCII headers RFC 2047, bodies quoted-printable or base64), so any
SMTP server takes it without SMTPUTF8 or 8BITMIME.

Header injection is stopped twice. Every header value from outside passes ``check_header_text``,
which refuses a line break or NUL in the text *and in every RFC 2047 decoding of it* (the email
package decodes ``=?utf-8?b?...?=`` on its own and would write a decoded CR LF out); ``compose``
then checks each header of the finished message the same way. And the policy that writes the
message (:data:`POLICY`) refuses to fold a header into anything but one header line plus
whitespace-led continuation lines, so no decoded CR/LF can reach the wire by any path.
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, getaddresses
from typing import Any

from carrier import __version__
from carrier.errors import CarrierError
from carrier.formats import line_break_in
from carrier.mail.htmltext import html_to_text
from carrier.mail.records import Address


class ComposeError(CarrierError):
    """A draft cannot become a message (bad address, header injection, missing recipient)."""


def _check_folded(name: str, folded: str, linesep: str) -> None:
    """``folded`` must be one ``name:`` line plus continuation lines that start with a space or tab."""
    text = folded[: -len(linesep)] if folded.endswith(linesep) else folded
    lines = text.split(linesep)
    bad = (
        not lines[0].lower().startswith(name.lower() + ":")
        or any(line_break_in(line) for line in lines)
        or any(line[:1] not in (" ", "\t") or not line.strip() for line in lines[1:])
    )
    if bad:
        raise ComposeError(
            f"header {name} would not stay one header on the wire (header injection is refused)"
        )


class WirePolicy(EmailPolicy):
    """``EmailPolicy`` that refuses to write a header folded into more than one header (or a blank line).

    The last line of defence: whatever the email package decoded or re-encoded, what is written is
    one header line and its whitespace-led continuations.
    """

    def fold(self, name: str, value: Any) -> str:
        folded: str = super().fold(name, value)
        _check_folded(name, folded, self.linesep)
        return folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        folded = super().fold_binary(name, value)
        _check_folded(name, folded.decode("ascii", "surrogateescape"), self.linesep)
        return folded


#: SMTP framing (CRLF) with the fold check; :data:`POLICY` adds 7-bit transfer encodings.
SMTP_POLICY = WirePolicy(linesep="\r\n")
#: Generation policy: CRLF, 7-bit transfer encodings, headers that cannot break out of their line.
POLICY = SMTP_POLICY.clone(cte_type="7bit")
#: How many rounds of RFC 2047 decoding ``check_header_text`` follows (nested encoded words), and
#: how many distinct decodings it looks at, before it calls the value too convoluted to send.
_MAX_DECODE_ROUNDS = 8
_MAX_DECODINGS = 32
USER_AGENT = f"carrier/{__version__}"
#: References kept in a reply: RFC 5322 allows trimming; keep the first id (the thread root) and the
#: most recent ones, which is what clients thread on.
MAX_REFERENCES = 40
_REPLY_PREFIX = re.compile(r"^\s*(re|aw|sv|antw|vs|r)\s*(\[\d+\])?\s*:", re.IGNORECASE)
_DOMAIN = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_MSGID = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")


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


def _decoded_once(text: str) -> set[str]:
    """What RFC 2047 decoding makes of ``text``: as ``email.header`` reads it (encoded words
    anywhere) and as the email package's header parser does when it stores a header."""
    out: set[str] = set()
    # An unknown charset or undecodable bytes stop this reading; the parser below copes with them.
    with contextlib.suppress(LookupError, UnicodeError, ValueError):
        out.add(str(make_header(decode_header(text))))
    out.add(str(SMTP_POLICY.header_factory("subject", text)))
    return out


def header_decodings(value: str) -> list[str]:
    """``value`` first, then every text RFC 2047 decoding makes of it, nested decodings included
    (a decoded text that holds encoded words again is decoded again, as the next reader would).

    ComposeError when the nesting goes deeper than any honest header needs.
    """
    forms = [value]
    seen = {value}
    todo = [value]
    for _ in range(_MAX_DECODE_ROUNDS):
        fresh = [d for text in todo if "=?" in text for d in _decoded_once(text) if d not in seen]
        if not fresh:
            return forms
        seen.update(fresh)
        forms.extend(dict.fromkeys(fresh))
        if len(forms) > _MAX_DECODINGS:
            break
        todo = fresh
    raise ComposeError("a header value nests RFC 2047 encoded words too deeply: send it as plain text")


def check_header_text(value: str, what: str) -> str:
    """``value`` if neither it nor any RFC 2047 decoding of it holds a line break or NUL.

    The one check for every header text Carrier writes from outside input (subject, display names,
    addresses, Message-IDs, file names, extra headers); ComposeError naming ``what`` otherwise.
    Line breaks are CR, LF and the other characters :data:`carrier.formats.LINE_BREAK_CHARS` lists
    (U+0085, U+2028, U+2029, ...).
    """
    if not isinstance(value, str):
        raise ComposeError(f"{what} must be text, not {type(value).__name__}")
    for position, form in enumerate(header_decodings(value)):
        char = line_break_in(form)
        if char:
            how = " once its RFC 2047 encoded words (=?charset?B/Q?...?=) are decoded" if position else ""
            raise ComposeError(
                f"{what} contains a line break or NUL ({char}){how}: remove it (header injection is refused)"
            )
    return value


def check_headers(msg: EmailMessage) -> None:
    """Every header of every part of ``msg``, decoded and folded as it will be sent, is one line of
    text: ComposeError naming the header otherwise (the net under the per-field checks)."""
    for part in msg.walk():
        for name, value in part.items():
            check_header_text(str(value), f"header {name}")
            params = getattr(value, "params", None) or {}
            for key, param in params.items():
                check_header_text(str(param), f"header {name} parameter {key}")
            POLICY.fold(name, value)


def check_address(addr: str, what: str = "address") -> str:
    """``addr`` if it is one plain ``local@domain`` address, else ComposeError naming the problem."""
    addr = check_header_text(addr, what).strip()
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
        check_header_text(item, what)
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
    """``<id@domain>`` from ``value`` (angle brackets added when missing); printable ASCII only and no
    encoded words, since In-Reply-To and References are decoded like free text."""
    check_header_text(value, what)
    value = value.strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    if not _MSGID.match(value) or not value.isascii() or not value.isprintable() or "=?" in value:
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
    try:
        return _build(draft, now=now, message_id=message_id)
    except ValueError as exc:  # the email package's own refusals (it checks some values itself)
        raise ComposeError(f"a header cannot be written safely: {exc}") from None


def _build(draft: Draft, *, now: datetime | None, message_id: str | None) -> EmailMessage:
    if not (draft.to or draft.cc or draft.bcc):
        raise ComposeError("no recipients: give at least one address in to, cc or bcc")
    subject = check_header_text(draft.subject, "subject")
    for address in (draft.sender, *draft.to, *draft.cc, *draft.bcc):
        check_header_text(address.name, f"the display name of {address.addr}")
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
        if not re.fullmatch(r"[!-9;-~]+", name):
            raise ComposeError(f"header name {name!r} is not a header name: printable ASCII without ':'")
        msg[name] = check_header_text(value, f"header {name}")

    body = draft.body
    if not body.strip() and draft.body_html:
        body = html_to_text(draft.body_html)
    msg.set_content(body if body.endswith("\n") else body + "\n")  # sets MIME-Version too
    if draft.body_html:
        msg.add_alternative(draft.body_html, subtype="html")
    for attachment in draft.attachments:
        name = check_attachment_name(attachment.filename)
        main, sub = _maintype(attachment.mime_type, name)
        msg.add_attachment(attachment.content, maintype=main, subtype=sub, filename=name)
    check_headers(msg)
    for part, attachment in zip(msg.iter_attachments(), draft.attachments, strict=False):
        if part.get_filename() != attachment.filename:  # quoting or RFC 2231 would change the name
            raise ComposeError(
                f"attachment file name {attachment.filename!r} would reach the recipient changed "
                "(encoded words =?...?= or quoting in it): rename the file"
            )
    return msg


def check_attachment_name(filename: str) -> str:
    """``filename`` if it is a plain file name that is safe in a Content-Disposition header."""
    name = check_header_text(filename, "an attachment file name")
    if not name or "/" in name or "\\" in name:
        raise ComposeError(f"attachment file name {name!r} must be a plain file name")
    return name


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
