"""Outbound composition: guaranteed headers, MIME shape by body, non-ASCII encoding, threading helpers."""

from __future__ import annotations

import email
import re
import socket
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from email.policy import default

import pytest

from carrier import __version__
from carrier.mail.compose import (
    ComposeError,
    Draft,
    OutgoingAttachment,
    compose,
    envelope_recipients,
    parse_recipients,
    reply_references,
    reply_subject,
    to_bytes,
    without,
)
from carrier.mail.parse import parse_message
from carrier.mail.records import Address

SENDER = Address(name="Carrier", addr="carrier@example.test")


def draft(**changes: object) -> Draft:
    base: dict[str, object] = {
        "sender": SENDER,
        "to": parse_recipients("Ops <ops@example.test>", "to"),
        "subject": "Status",
        "body": "All good.",
    }
    base.update(changes)
    return Draft(**base)  # type: ignore[arg-type]


def reparse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=default)


def test_every_guaranteed_header_is_present() -> None:
    when = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    msg = reparse(to_bytes(compose(draft(), now=when)))
    assert msg["Date"] == "Tue, 04 Mar 2025 03:06:07 +0000"  # converted to UTC
    assert re.fullmatch(r"<[0-9a-f-]{36}@example\.test>", msg["Message-ID"])
    assert msg["From"] == "Carrier <carrier@example.test>"
    assert msg["To"] == "Ops <ops@example.test>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["User-Agent"] == f"carrier/{__version__}"
    assert msg["Subject"] == "Status"
    assert msg["In-Reply-To"] is None and msg["References"] is None


def test_message_id_uses_the_sender_domain_never_the_host_name() -> None:
    ids = {str(compose(draft())["Message-ID"]) for _ in range(20)}
    assert len(ids) == 20
    host = socket.getfqdn()
    for value in ids:
        assert value.endswith("@example.test>")
        assert host not in value and socket.gethostname() not in value


def test_text_only_body_is_a_single_text_plain_part() -> None:
    msg = reparse(to_bytes(compose(draft())))
    assert msg.get_content_type() == "text/plain" and not msg.is_multipart()
    assert msg.get_content().strip() == "All good."


def test_text_and_html_make_multipart_alternative() -> None:
    msg = reparse(to_bytes(compose(draft(body_html="<p>All <b>good</b>.</p>"))))
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_attachments_make_multipart_mixed_around_the_body() -> None:
    files = (
        OutgoingAttachment("report.pdf", b"%PDF-1.4\n", "application/pdf"),
        OutgoingAttachment("notes.txt", b"plain notes\n", ""),
    )
    msg = reparse(to_bytes(compose(draft(body_html="<p>x</p>", attachments=files))))
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_parts())
    assert parts[0].get_content_type() == "multipart/alternative"
    assert [p.get_filename() for p in parts[1:]] == ["report.pdf", "notes.txt"]
    assert parts[1].get_content_type() == "application/pdf"
    assert parts[2].get_content_type() == "text/plain"  # guessed from the name
    assert parts[1].get_content() == b"%PDF-1.4\n"


def test_non_ascii_subject_names_bodies_and_file_names_survive_a_round_trip() -> None:
    d = draft(
        sender=Address(name="Jürgen Bot", addr="carrier@example.test"),
        to=parse_recipients("Zoë Müller <zoe@example.test>, 王小明 <wang@example.test>", "to"),
        subject="Prix 5 € — 中文 Grüße",
        body="Grüße, 5 € und 中文.\n" * 3,
        body_html="<p>Grüße € 中文</p>",
        attachments=(OutgoingAttachment("résumé 中.txt", "ü".encode(), "text/plain"),),
    )
    data = to_bytes(compose(d))
    data.decode("ascii")  # 7-bit clean on the wire: no SMTPUTF8/8BITMIME needed
    parsed = parse_message(data)
    assert parsed.headers.subject == "Prix 5 € — 中文 Grüße"
    assert parsed.headers.from_ == [Address(name="Jürgen Bot", addr="carrier@example.test")]
    assert [a.name for a in parsed.headers.to] == ["Zoë Müller", "王小明"]
    assert parsed.text.startswith("Grüße, 5 € und 中文.")
    assert "Grüße € 中文" in parsed.html
    assert parsed.attachments[0].filename == "résumé 中.txt"
    assert parsed.attachment(0) == "ü".encode()


def test_threading_headers_when_answering() -> None:
    msg = reparse(to_bytes(compose(draft(in_reply_to="<b@x.test>", references=("<a@x.test>", "<b@x.test>")))))
    assert msg["In-Reply-To"] == "<b@x.test>"
    assert msg["References"] == "<a@x.test> <b@x.test>"


def test_bcc_is_kept_in_the_message_but_is_an_envelope_recipient() -> None:
    d = draft(
        cc=parse_recipients(["a@example.test"], "cc"), bcc=parse_recipients("hidden@example.test", "bcc")
    )
    assert envelope_recipients(d) == ["ops@example.test", "a@example.test", "hidden@example.test"]
    assert compose(d)["Bcc"] == "hidden@example.test"  # smtplib drops it from what goes out


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"subject": "hi\r\nBcc: victim@example.test"}, "subject contains a line break"),
        ({"subject": "hi\nX: y"}, "subject contains a line break"),
        ({"to": (Address(name="A\r\nB", addr="a@example.test"),)}, "display name"),
        ({"to": ()}, "no recipients"),
        ({"in_reply_to": "not an id"}, "is not a Message-ID"),
        ({"references": ("<ok@x.test>", "<bad id@x>")}, "is not a Message-ID"),
        ({"attachments": (OutgoingAttachment("../etc/passwd", b"x"),)}, "plain file name"),
    ],
)
def test_unsafe_drafts_are_refused(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ComposeError, match=re.escape(fragment)):
        compose(draft(**changes))


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("not-an-address", "is not an email address"),
        ("a@b@c", "cannot read"),
        ("Ops <ops@example.test>\r\nBcc: x@y", "line break"),
        ("a@exa mple.test", "cannot read"),
        ("a@-bad-.test", "invalid domain"),
        ("jürgen@example.test", "non-ASCII local parts"),
    ],
)
def test_bad_recipients_are_refused_with_the_reason(value: str, fragment: str) -> None:
    with pytest.raises(ComposeError, match=re.escape(fragment)):
        parse_recipients(value, "to")


def test_recipients_accept_lists_and_comma_separated_strings() -> None:
    assert parse_recipients(["A <a@example.test>", "b@example.test, C <c@example.test>"], "to") == (
        Address(name="A", addr="a@example.test"),
        Address(name="", addr="b@example.test"),
        Address(name="C", addr="c@example.test"),
    )
    assert parse_recipients(None, "cc") == ()
    assert parse_recipients("x@bücher.example", "to")[0].addr == "x@xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Status", "Re: Status"),
        ("Re: Status", "Re: Status"),
        ("RE:Status", "RE:Status"),
        ("AW: Status", "AW: Status"),
        ("Re[2]: Status", "Re[2]: Status"),
        ("  Status \n  report ", "Re: Status report"),
        ("", "Re:"),
        ("Regarding: x", "Re: Regarding: x"),
    ],
)
def test_reply_subject_gets_one_re_prefix(subject: str, expected: str) -> None:
    assert reply_subject(subject) == expected


def test_reply_references_chain() -> None:
    assert reply_references(["<a@x>", "<b@x>"], "<b@x>", "<c@x>") == ("<a@x>", "<b@x>", "<c@x>")
    assert reply_references([], "<b@x>", "<c@x>") == ("<b@x>", "<c@x>")
    assert reply_references([], None, "<c@x>") == ("<c@x>",)
    long = [f"<{i}@x>" for i in range(100)]
    kept = reply_references(long, None, "<new@x>")
    assert len(kept) == 40 and kept[0] == "<0@x>" and kept[-1] == "<new@x>" and kept[-2] == "<99@x>"


def test_without_drops_self_and_duplicates_case_insensitively() -> None:
    people = [Address(addr="Me@Example.test"), Address(addr="a@x.test"), Address(name="A", addr="A@x.test")]
    assert without(people, ["me@example.test"]) == (Address(addr="a@x.test"),)


def test_default_date_is_now_in_utc() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = email.utils.parsedate_to_datetime(str(compose(draft())["Date"]))
    assert stamp.utcoffset() == timedelta(0)
    assert before <= stamp <= datetime.now(UTC) + timedelta(seconds=1)


def test_html_only_draft_gets_a_text_part_converted_from_the_html() -> None:
    msg = reparse(to_bytes(compose(draft(body="", body_html="<h1>Title</h1><p>Para</p>"))))
    text = next(p for p in msg.iter_parts() if p.get_content_type() == "text/plain").get_content()
    assert "Title" in text and "Para" in text and "<" not in text
