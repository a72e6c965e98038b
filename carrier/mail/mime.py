"""MIME facts shared by the two ways Carrier looks at a message: a parsed whole message (parse.py)
and an IMAP BODYSTRUCTURE (imap.py). Both produce the same list of leaf parts, and the rules here
decide which leaves are the body and which are attachments, so attachment indexes agree.

Pure: no I/O. Charset decoding never raises: unknown or broken charsets give U+FFFD.
"""

from __future__ import annotations

import codecs
import mimetypes
import re
from collections.abc import Sequence
from dataclasses import dataclass

#: Labels seen in real mail mapped to the codec that decodes them best (supersets, Windows variants
#: that senders mislabel as ISO, names Python does not know).
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "utf-8",  # mislabelled 8-bit text is usually UTF-8
    "ascii": "utf-8",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "x-sjis": "shift_jis",
    "shift-jis": "shift_jis",
    "windows-874": "cp874",
    "x-mac-roman": "mac_roman",
    "unicode-1-1-utf-7": "utf-7",
}
_TOKEN = re.compile(r"[^\s;\"']+")


def codec_for(charset: str | None) -> str:
    """The Python codec to decode text labelled ``charset`` (UTF-8 for missing or unknown labels)."""
    if not charset:
        return "utf-8"
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except (LookupError, ValueError):
        return "utf-8"


def decode_text(data: bytes, charset: str | None) -> str:
    """``data`` as text; undecodable bytes become U+FFFD, never an exception."""
    try:
        return data.decode(codec_for(charset), errors="replace")
    except (LookupError, ValueError, TypeError):  # a codec that fails in its own way (utf-7 state)
        return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Leaf:
    """One non-multipart part, in depth-first order. ``number`` is its IMAP part number ("1.2")."""

    number: str
    mime_type: str  # lower case, e.g. text/plain
    charset: str | None
    encoding: str  # content-transfer-encoding, lower case ("7bit" when absent)
    disposition: str | None  # "inline", "attachment" or None
    filename: str | None
    size: int  # encoded octets


@dataclass(frozen=True)
class Layout:
    """Which leaves hold the text and HTML body, and the attachments in index order."""

    text: tuple[Leaf, ...]
    html: tuple[Leaf, ...]
    attachments: tuple[Leaf, ...]


def is_body(leaf: Leaf) -> bool:
    """Text or HTML a mail client would show in the message, not offer as a file."""
    if leaf.mime_type not in ("text/plain", "text/html"):
        return False
    return leaf.disposition != "attachment" and not leaf.filename


def classify(leaves: Sequence[Leaf]) -> Layout:
    text = tuple(leaf for leaf in leaves if is_body(leaf) and leaf.mime_type == "text/plain")
    html = tuple(leaf for leaf in leaves if is_body(leaf) and leaf.mime_type == "text/html")
    attachments = tuple(leaf for leaf in leaves if not is_body(leaf))
    return Layout(text=text, html=html, attachments=attachments)


def attachment_name(leaf: Leaf) -> str:
    """The attachment's file name, or a made-up one (``part-2.pdf``) when the sender gave none."""
    if leaf.filename:
        return leaf.filename
    if leaf.mime_type == "message/rfc822":
        return f"message-{leaf.number}.eml"
    extension = mimetypes.guess_extension(leaf.mime_type) or ".bin"
    return f"part-{leaf.number}{extension}"


def normalize_mime_type(value: str | None, default: str = "text/plain") -> str:
    """``type/subtype`` in lower case; a malformed value becomes ``application/octet-stream``."""
    if not value:
        return default
    token = _TOKEN.match(value.strip())
    text = token.group(0).lower() if token else ""
    if "/" not in text or text.startswith("/") or text.endswith("/"):
        return "application/octet-stream"
    return text


def param_value(pairs: Sequence[tuple[str, str]], name: str) -> str | None:
    """Parameter ``name`` from raw MIME parameters (RFC 2231 ``name*``/continuations decoded)."""
    from email.utils import collapse_rfc2231_value, decode_params

    wanted = name.lower()
    relevant = [(k.lower(), v) for k, v in pairs if k.lower().split("*", 1)[0] == wanted]
    if not relevant:
        return None
    try:
        decoded = decode_params([("", ""), *relevant])[1:]
    except (ValueError, LookupError, IndexError):
        return None
    for key, value in decoded:
        if key == wanted:
            try:
                text = collapse_rfc2231_value(value, errors="replace")
            except LookupError:  # unknown charset named in name*=
                text = str(value[2]) if isinstance(value, tuple) else str(value)
            return text.strip().strip('"') or None
    return None
