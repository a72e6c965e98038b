"""Header injection: ``check_header_text`` refuses a line break or NUL in a header value and in every
RFC 2047 decoding of it; ``compose`` applies it to every header it writes from outside input; the
write policy refuses to put a header on the wire that would not stay one header."""

from __future__ import annotations

import base64
import email
from email.message import EmailMessage
from email.policy import default

import pytest

from carrier.formats import LINE_BREAK_CHARS, line_break_in, token_problem
from carrier.mail.compose import (
    POLICY,
    ComposeError,
    Draft,
    OutgoingAttachment,
    check_header_text,
    check_message_id,
    compose,
    header_decodings,
    parse_recipients,
    to_bytes,
)
from carrier.mail.records import Address
from carrier.mail.replies import ReplyBody, body_entity

EVIL = "hi\r\nReply-To: evil@evil.test\r\n\r\nFORGED BODY"
SENDER = Address(name="Carrier", addr="carrier@example.test")


def b_word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?b?{base64.b64encode(text.encode(charset)).decode()}?="


def q_word(text: str, charset: str = "utf-8") -> str:
    def one(c: str) -> str:
        if c.isalnum() and c.isascii():
            return c
        return "_" if c == " " else "".join(f"={b:02X}" for b in c.encode(charset))

    body = "".join(one(c) for c in text)
    return f"=?{charset}?q?{body}?="


HOSTILE = {
    "b word": b_word(EVIL),
    "q word": q_word(EVIL),
    "B upper case": b_word(EVIL).replace("?b?", "?B?"),
    "latin-1 q word": q_word("hi\r\nBcc: evil@evil.test", "iso-8859-1"),
    "adjacent words": f"{q_word('hi')} {q_word(chr(13) + chr(10) + 'Bcc: evil@evil.test')}",
    "word inside text": f"report{b_word(EVIL)}end",
    "nested words": b_word(b_word(EVIL)),
    "nested three deep": b_word(b_word(b_word(EVIL))),
    "folded CRLF space": "hi\r\n Reply-To: evil@evil.test",
    "bare CR": "hi\rReply-To: evil@evil.test",
    "bare LF": "hi\nReply-To: evil@evil.test",
    "NUL": "hi\x00there",
    "U+2028": "hi\u2028Reply-To: evil@evil.test",
    "U+2029": "hi\u2029Reply-To: evil@evil.test",
    "U+0085": "hi\x85Reply-To: evil@evil.test",
    "encoded U+2028": b_word("hi\u2028Reply-To: evil@evil.test"),
    "encoded NUL": q_word("hi\x00there"),
    "encoded vertical tab": b_word("hi\x0bthere"),
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_check_header_text_refuses_breaks_raw_and_decoded(value: str) -> None:
    with pytest.raises(ComposeError, match=r"^subject contains a line break or NUL \(U\+00[0-9A-F]{2}|U\+20"):
        check_header_text(value, "subject")


def test_the_message_says_when_the_break_came_from_decoding() -> None:
    with pytest.raises(ComposeError) as raw:
        check_header_text("a\r\nb", "subject")
    assert str(raw.value) == (
        "subject contains a line break or NUL (U+000D): remove it (header injection is refused)"
    )
    with pytest.raises(ComposeError) as decoded:
        check_header_text(b_word(EVIL), "the display name of ops@example.test")
    expected = "the display name of ops@example.test contains a line break or NUL (U+000D) once its RFC 2047"
    assert expected in str(decoded.value)


@pytest.mark.parametrize(
    "value",
    [
        "Status report",
        "Grüße €",
        q_word("Grüße"),
        f"{b_word('中文')} and {q_word('more')}",
        "tab\tinside",
        "=?x",
    ],
)
def test_honest_header_text_passes_unchanged(value: str) -> None:
    assert check_header_text(value, "subject") == value


def test_decodings_follow_nesting_and_give_up_when_absurd() -> None:
    forms = header_decodings(b_word(b_word("plain")))
    assert forms[0] == b_word(b_word("plain")) and "plain" in forms
    absurd = "plain"
    for _ in range(12):
        absurd = b_word(absurd)
    with pytest.raises(ComposeError, match="nests RFC 2047 encoded words too deeply"):
        header_decodings(absurd)


def test_line_break_chars_are_what_splitlines_splits_on_plus_nul() -> None:
    splitters = {chr(i) for i in range(0x3000) if len(f"a{chr(i)}b".splitlines()) > 1}
    assert splitters | {"\x00"} == set(LINE_BREAK_CHARS)
    assert line_break_in("ok\u2029") == "U+2029" and line_break_in("fine") is None


def draft(**changes: object) -> Draft:
    base: dict[str, object] = {
        "sender": SENDER,
        "to": parse_recipients("Ops <ops@example.test>", "to"),
        "subject": "Status",
        "body": "All good.",
    }
    base.update(changes)
    return Draft(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"subject": b_word(EVIL)}, "subject contains a line break"),
        ({"to": (Address(name=b_word("N\r\nBcc: evil@evil.test"), addr="ops@example.test"),)},
         "the display name of ops@example.test contains a line break"),
        ({"sender": Address(name=q_word("C\r\nX: y"), addr="carrier@example.test")},
         "the display name of carrier@example.test"),
        ({"attachments": (OutgoingAttachment(b_word("a\r\nX-Evil: 1"), b"x"),)},
         "an attachment file name contains a line break"),
        ({"attachments": (OutgoingAttachment(q_word("ok.txt"), b"x"),)}, "would reach the recipient changed"),
        ({"in_reply_to": f"<{b_word(EVIL)}@x.test>"}, "in_reply_to contains a line break"),
        ({"references": ("<a@x.test>", f"<{q_word('a')}@x.test>")}, "references .* is not a Message-ID"),
        ({"extra_headers": (("X-Note", b_word(EVIL)),)}, "header X-Note contains a line break"),
        ({"extra_headers": (("X-Note: y\r\nBcc", "v"),)}, "is not a header name"),
    ],
)
def test_compose_refuses_every_decoded_injection(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ComposeError, match=fragment):
        compose(draft(**changes))


@pytest.mark.parametrize(
    "value",
    [f"{b_word('N' + chr(13) + chr(10) + 'Bcc: e@evil.test')} <ops@example.test>",
     f'"{q_word("N" + chr(10) + "Bcc: e@evil.test")}" <ops@example.test>',
     f"{b_word('x' + chr(13) + chr(10) + 'Bcc: e')}@example.test",
     "Ops\u2028Bcc <ops@example.test>"],
)
def test_recipients_with_decoded_breaks_are_refused(value: str) -> None:
    with pytest.raises(ComposeError, match="line break"):
        parse_recipients(value, "to")


def test_a_quote_in_a_file_name_stays_inside_the_file_name() -> None:
    name = "a\"; filename*=utf-8''x%0D%0AReply-To%3A%20evil%40evil.test"
    message = reparse(to_bytes(compose(draft(attachments=(OutgoingAttachment(name, b"x"),)))))
    (part,) = message.iter_attachments()
    assert part.get_filename() == name
    assert message["Reply-To"] is None


def test_honest_encoded_words_are_sent_decoded_and_re_encoded() -> None:
    to = parse_recipients(f"{b_word('Jörg')} <ops@example.test>", "to")
    message = reparse(to_bytes(compose(draft(subject=q_word("Grüße"), to=to))))
    assert message["Subject"] == "Grüße"
    assert message["To"].addresses[0].display_name == "Jörg"
    assert set(message.keys()) == {
        "Date", "Message-ID", "From", "To", "Subject", "User-Agent", "MIME-Version",
        "Content-Type", "Content-Transfer-Encoding",
    }


def reparse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=default)


def test_the_write_policy_refuses_a_header_that_would_break_its_line() -> None:
    # Past every input check (set directly on a message): the policy alone stops the decoded CRLF.
    message = EmailMessage(policy=POLICY)
    message["Subject"] = b_word(EVIL)
    message.set_content("x")
    with pytest.raises(ComposeError, match="header Subject would not stay one header on the wire"):
        to_bytes(message)


def test_the_reply_body_entity_checks_its_file_names() -> None:
    body = ReplyBody("text", "", (OutgoingAttachment(b_word("j.log\r\nX-Evil: 1"), b"log", "text/plain"),))
    with pytest.raises(ComposeError, match="an attachment file name contains a line break"):
        body_entity(body)


def test_check_message_id_still_takes_plain_ids() -> None:
    assert check_message_id("abc@example.test", "in_reply_to") == "<abc@example.test>"
    with pytest.raises(ComposeError, match="line break"):
        check_message_id("<a@x>\r\nBcc: e@evil.test", "in_reply_to")


# --------------------------------------------------------------------------- bearer tokens


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("A" * 43 + "\r\nX: y", "line break"),
        ("A" * 43 + "\n", "line break"),
        ("A" * 20 + "\x00" + "A" * 22, "line break or NUL"),
        ("A" * 20 + "\u2028" + "A" * 22, "line break"),
        ("A" * 20 + " " + "A" * 22, "spaces or tabs"),
        ("A" * 42 + "é", "characters other than"),
        ("A" * 42, "42 characters long"),
    ],
)
def test_token_problem_names_the_fault_and_never_the_token(value: str, fragment: str) -> None:
    problem = token_problem(value)
    assert problem is not None and fragment in problem
    assert "AAAA" not in problem


def test_a_token_as_issued_is_well_formed() -> None:
    from carrier.auth.tokens import new_token

    assert token_problem(new_token()) is None


def test_bearer_token_checks_the_form_and_registers_every_piece_for_redaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import carrier.log
    from carrier.log import RedactingFilter, redact
    from carrier.mcp.remote import RemoteError, bearer_token

    monkeypatch.setattr(carrier.log, "_FILTER", RedactingFilter())  # keep the process-wide one clean

    good = "Zq" * 21 + "Z"
    assert bearer_token({"T": good + "\n"}, "T") == good
    assert "***" in redact(f"x {good} y") and good not in redact(f"x {good} y")
    with pytest.raises(RemoteError) as refused:
        bearer_token({"T": good + "\r\nX-Leak: yes-this-part"}, "T")
    assert str(refused.value).startswith("$T does not hold a Carrier token: it contains a line break")
    assert good not in str(refused.value)
    assert "yes-this-part" not in redact("header: X-Leak: yes-this-part")
    with pytest.raises(RemoteError, match=r"^\$T is empty"):
        bearer_token({}, "T")


def test_an_email_door_reply_to_a_nested_subject_and_encoded_ids_stays_writable() -> None:
    # The door answers the sender's mail: a subject that decodes to an encoded word again, and
    # Message-IDs holding encoded words, must neither inject nor make the reply impossible.
    from carrier.mail.parse import parse_headers
    from carrier.mail.replies import thread_of

    evil_id = f"<{b_word(EVIL)}@x.test>"
    raw = (
        f"From: a@x.test\r\nSubject: {b_word(b_word(EVIL))}\r\nMessage-ID: {evil_id}\r\n"
        f"References: <root@x.test> {evil_id}\r\n\r\n"
    ).encode()
    thread = thread_of(parse_headers(raw), "a@x.test")
    assert thread.in_reply_to is None and thread.references == ("<root@x.test>",)
    built = compose(
        draft(subject=thread.subject, in_reply_to=thread.in_reply_to, references=thread.references)
    )
    message = reparse(to_bytes(built))
    assert message["Reply-To"] is None and b"FORGED" not in to_bytes(built).split(b"\r\n\r\n", 1)[1]
    assert message["Subject"].startswith("Re: = ?utf-8?b?")
