"""Inbound mail to typed values: headers decoded, addresses as ``[{name, addr}]``, bodies as text.

Pure (no I/O). Mail is attacker-controlled, so nothing here raises on malformed input: unknown or
broken charsets and encodings degrade to U+FFFD, bad dates to None, odd MIME to attachments.
Messages are parsed with the ``compat32`` policy, the most forgiving one in the standard library.
"""

from __future__ import annotations

import base64
import binascii
import email
import quopri
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from email.errors import HeaderParseError
from email.header import Header, decode_header
from email.message import Message
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime

from carrier.mail.htmltext import html_to_text
from carrier.mail.mime import Leaf, attachment_name, classify, decode_text, normalize_mime_type
from carrier.mail.records import Address, AttachmentInfo

_MSGID = re.compile(r"<[^<>\s]+>")
_SPACE = re.compile(r"\s+")


def _unescape_8bit(value: object) -> str:
    """A raw header value as text. compat32 hands out raw 8-bit headers as a Header in the
    'unknown-8bit' charset (or as surrogates); such bytes are UTF-8 most of the time."""
    if isinstance(value, Header):
        try:
            chunks = decode_header(value)
        except (ValueError, LookupError, HeaderParseError):
            return str(value)
        return "".join(
            chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk for chunk, _ in chunks
        )
    text = str(value)
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def decode_header_value(value: object) -> str:
    """A header's text with RFC 2047 encoded words decoded and whitespace unfolded."""
    if value is None:
        return ""
    text = _unescape_8bit(value)
    try:
        parts = decode_header(text)
    except (ValueError, LookupError, binascii.Error, UnicodeError, HeaderParseError):
        return _SPACE.sub(" ", text).strip()
    out: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            out.append(decode_text(chunk, charset) if charset else chunk.decode("utf-8", "replace"))
        else:
            out.append(chunk)
    return _SPACE.sub(" ", "".join(out)).strip()


def parse_addresses(values: Iterable[object]) -> list[Address]:
    """Typed addresses from raw header values (display names decoded after splitting, so a decoded
    comma never splits a name)."""
    raw = [_unescape_8bit(v) for v in values if v is not None]
    found: list[Address] = []
    try:
        pairs = getaddresses(raw)
    except (ValueError, TypeError, IndexError):
        pairs = []
    for name, addr in pairs:
        addr = addr.strip()
        if not addr or "@" not in addr:
            continue
        found.append(Address(name=decode_header_value(name), addr=addr))
    return found


def parse_message_ids(value: object) -> list[str]:
    """Every ``<id>`` in a Message-ID, In-Reply-To or References value, in order, without repeats."""
    if value is None:
        return []
    text = _unescape_8bit(value)
    ids = _MSGID.findall(text)
    if not ids:
        bare = text.strip()
        if bare and "@" in bare and not _SPACE.search(bare):
            ids = [f"<{bare.strip('<>')}>"]
    return list(dict.fromkeys(ids))


def header_date_iso(value: object) -> str | None:
    """The Date header as ISO 8601 (UTC when the header has no zone), or None when unreadable."""
    if value is None:
        return None
    try:
        when = parsedate_to_datetime(_unescape_8bit(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat()


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """Undo a content-transfer-encoding; broken base64 decodes as much as it can."""
    encoding = encoding.lower()
    if encoding == "base64":
        # Lenient: skip line breaks and junk, repair missing padding, drop a dangling last character.
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
        if len(cleaned) % 4 == 1:
            cleaned = cleaned[:-1]
        cleaned += b"=" * (-len(cleaned) % 4)
        try:
            return base64.b64decode(cleaned)
        except (binascii.Error, ValueError):
            return b""
    if encoding == "quoted-printable":
        return quopri.decodestring(data)
    return data


# ---------------------------------------------------------------------------------------------
# Whole messages
# ---------------------------------------------------------------------------------------------


def _disposition(part: Message) -> str | None:
    value = part.get("Content-Disposition")
    if value is None:
        return None
    return str(value).split(";", 1)[0].strip().lower() or None


def _leaf_of(part: Message, number: str) -> Leaf:
    mime_type = normalize_mime_type(part.get("Content-Type"))
    try:
        charset = part.get_content_charset()
    except (LookupError, ValueError, TypeError):
        charset = None
    filename: str | None
    try:
        raw_name = part.get_filename()
        filename = decode_header_value(raw_name) if raw_name else None
    except (LookupError, ValueError, TypeError):
        filename = None
    payload = part.get_payload(decode=False)
    if isinstance(payload, list):  # message/rfc822: the encapsulated message
        size = sum(len(p.as_bytes()) for p in payload if isinstance(p, Message))
    else:
        size = len(str(payload).encode("utf-8", "surrogateescape"))
    encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower() or "7bit"
    return Leaf(
        number=number,
        mime_type=mime_type,
        charset=charset,
        encoding=encoding,
        disposition=_disposition(part),
        filename=filename or None,
        size=size,
    )


def message_leaves(message: Message) -> list[tuple[Leaf, Message]]:
    """Every leaf part with its IMAP part number, depth first; message/rfc822 parts are leaves."""
    out: list[tuple[Leaf, Message]] = []

    def walk(part: Message, number: str) -> None:
        mime_type = normalize_mime_type(part.get("Content-Type"))
        children = part.get_payload()
        if mime_type.startswith("multipart/") and isinstance(children, list):
            for index, child in enumerate(children, start=1):
                if isinstance(child, Message):
                    walk(child, f"{number}.{index}" if number else str(index))
            return
        out.append((_leaf_of(part, number or "1"), part))

    walk(message, "")
    return out


def leaf_bytes(part: Message) -> bytes:
    """A leaf's content with its transfer encoding undone."""
    payload = part.get_payload(decode=False)
    if isinstance(payload, list):
        return b"".join(p.as_bytes() for p in payload if isinstance(p, Message))
    encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if encoding in ("base64", "quoted-printable"):
        # The encoded text is ASCII; anything else in it is junk the decoder would skip anyway.
        return decode_transfer(str(payload or "").encode("ascii", "ignore"), encoding)
    data = part.get_payload(decode=True)  # 7bit/8bit/binary: the raw bytes, undamaged
    return data if isinstance(data, bytes) else b""


def leaf_text(leaf: Leaf, data: bytes) -> str:
    """A text leaf's decoded content, normalised to ``\\n`` line ends."""
    return decode_text(data, leaf.charset).replace("\r\n", "\n")


@dataclass(frozen=True)
class Headers:
    """The header fields Carrier shows, decoded."""

    message_id: str
    subject: str
    from_: list[Address]
    to: list[Address]
    cc: list[Address]
    reply_to: list[Address]
    date: str | None
    in_reply_to: str | None
    references: list[str]


def headers_of(message: Message) -> Headers:
    """Decoded headers of a parsed message (or of a header block parsed as one)."""
    ids = parse_message_ids(message.get("Message-ID"))
    in_reply_to = parse_message_ids(message.get("In-Reply-To"))
    return Headers(
        message_id=ids[0] if ids else "",
        subject=decode_header_value(message.get("Subject")),
        from_=parse_addresses(message.get_all("From", [])),
        to=parse_addresses(message.get_all("To", [])),
        cc=parse_addresses(message.get_all("Cc", [])),
        reply_to=parse_addresses(message.get_all("Reply-To", [])),
        date=header_date_iso(message.get("Date")),
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=parse_message_ids(" ".join(_unescape_8bit(v) for v in message.get_all("References", []))),
    )


def parse_headers(raw: bytes) -> Headers:
    """Decoded headers from a header block (e.g. BODY.PEEK[HEADER])."""
    return headers_of(email.message_from_bytes(raw, policy=compat32))


@dataclass(frozen=True)
class ParsedMessage:
    """A whole message parsed; ``attachment(i)`` gives attachment ``i``'s decoded bytes."""

    message: Message
    headers: Headers
    text: str
    html: str
    attachments: list[AttachmentInfo]
    attachment_parts: tuple[Message, ...]

    def attachment(self, index: int) -> bytes:
        return leaf_bytes(self.attachment_parts[index])

    def best_text(self) -> str:
        """The text body, or the HTML body converted to text when there is no text part."""
        return self.text if self.text.strip() or not self.html else html_to_text(self.html)


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse a whole RFC 5322 message; never raises on malformed content."""
    message = email.message_from_bytes(raw, policy=compat32)
    pairs = message_leaves(message)
    layout = classify([leaf for leaf, _ in pairs])
    by_number = {leaf.number: part for leaf, part in pairs}
    text = "\n\n".join(leaf_text(leaf, leaf_bytes(by_number[leaf.number])) for leaf in layout.text)
    html = "\n".join(leaf_text(leaf, leaf_bytes(by_number[leaf.number])) for leaf in layout.html)
    attachments = [
        AttachmentInfo(index=i, filename=attachment_name(leaf), mime_type=leaf.mime_type, size=leaf.size)
        for i, leaf in enumerate(layout.attachments)
    ]
    return ParsedMessage(
        message=message,
        headers=headers_of(message),
        text=text,
        html=html,
        attachments=attachments,
        attachment_parts=tuple(by_number[leaf.number] for leaf in layout.attachments),
    )
