"""Issue 13.1: a hostile-input corpus for the headers of `mail_send` and `mail_reply`, driven through a
real MCP client session (stdio to `carrier mcp`) against the sandbox. Every hostile value is a clear
tool error naming the field, and Dovecot receives nothing injected: no Reply-To, Bcc or extra header
from the input and no forged body, in the recipient's INBOX or in the sender's Sent folder.

Each case carries the run's tag in its body, so a case that slipped through is found by a body
search; an honest send (encoded words that decode to plain text) in the same session is found the
same way, so an empty search means "refused", not "searched wrong"."""

from __future__ import annotations

import base64
import email
import re
import sys
from email.policy import default
from pathlib import Path
from typing import Any

import anyio
import pytest
from mail_support import deliver, imap_as, token, write_config
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult

from carrier.sandbox.layout import Layout, address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[2]
EVIL = "hi\r\nReply-To: evil@evil.test\r\nBcc: evil@evil.test\r\nX-Injected: yes\r\n\r\nFORGED BODY"
OPS = address("ops")


def b_word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?b?{base64.b64encode(text.encode(charset)).decode()}?="


def q_word(text: str, charset: str = "utf-8") -> str:
    def one(c: str) -> str:
        if c.isalnum() and c.isascii():
            return c
        return "_" if c == " " else "".join(f"={b:02X}" for b in c.encode(charset))

    return f"=?{charset}?q?{''.join(one(c) for c in text)}?="


CRLF_BCC = "\r\nBcc: evil@evil.test"
#: (case, mail_send arguments beyond to/subject/body, what the error must say).
SEND_CORPUS: list[tuple[str, dict[str, Any], str]] = [
    ("subject b word", {"subject": b_word(EVIL)}, r"subject contains a line break .*once its RFC 2047"),
    ("subject q word", {"subject": q_word(EVIL)}, r"subject contains a line break .*once its RFC 2047"),
    ("subject B upper", {"subject": b_word(EVIL).replace("?b?", "?B?")}, r"subject contains a line break"),
    ("subject latin-1", {"subject": q_word(EVIL, "iso-8859-1")}, r"subject contains a line break"),
    ("subject adjacent words", {"subject": f"{q_word('hi')} {q_word(CRLF_BCC)}"}, r"subject contains a line"),
    ("subject word in text", {"subject": f"report{b_word(EVIL)}end"}, r"subject contains a line break"),
    ("subject nested words", {"subject": b_word(b_word(EVIL))}, r"subject contains a line break"),
    ("subject folded CRLF SP", {"subject": "hi\r\n Reply-To: evil@evil.test"}, r"subject contains a line"),
    ("subject bare CR", {"subject": "hi\rReply-To: evil@evil.test"}, r"subject contains a line break"),
    ("subject bare LF", {"subject": "hi\nReply-To: evil@evil.test"}, r"subject contains a line break"),
    ("subject NUL", {"subject": "hi\x00Reply-To: evil@evil.test"}, r"subject contains a line break or NUL"),
    ("subject U+2028", {"subject": "hi\u2028Reply-To: evil@evil.test"}, r"subject .*\(U\+2028\)"),
    ("subject U+2029", {"subject": "hi\u2029Reply-To: evil@evil.test"}, r"subject .*\(U\+2029\)"),
    ("subject U+0085", {"subject": "hi\x85Reply-To: evil@evil.test"}, r"subject .*\(U\+0085\)"),
    ("subject encoded U+2028", {"subject": b_word("hi\u2028Reply-To: e@evil.test")}, r"subject .*U\+2028"),
    ("subject encoded NUL", {"subject": q_word("hi\x00there")}, r"subject .*\(U\+0000\)"),
    ("to name b word", {"to": f"{b_word('Ops' + CRLF_BCC)} <{OPS}>"}, r"to contains a line break"),
    ("to name quoted q word", {"to": [f'"{q_word("Ops" + CRLF_BCC)}" <{OPS}>']}, r"to contains a line break"),
    ("to name U+2028", {"to": [f"Ops\u2028Bcc: evil@evil.test <{OPS}>"]}, r"to contains a line break"),
    ("to local part word", {"to": [f"{b_word('x' + CRLF_BCC)}@example.test"]}, r"to contains a line break"),
    ("cc name nested", {"cc": [f"{b_word(b_word('C' + CRLF_BCC))} <{OPS}>"]}, r"cc contains a line break"),
    ("bcc name U+0085", {"bcc": [f"B\x85X: y <{OPS}>"]}, r"bcc contains a line break"),
    (
        "filename b word",
        {"attachments": [{"filename": b_word("a.txt\r\nX-Injected: yes"), "content_base64": "eA=="}]},
        r"attachment file name contains a line break .*once its RFC 2047",
    ),
    (
        "filename q word",
        {"attachments": [{"filename": q_word("a.txt\r\nX-Injected: yes"), "content_base64": "eA=="}]},
        r"attachment file name contains a line break",
    ),
    (
        "filename bare LF",
        {"attachments": [{"filename": "a.txt\nX-Injected: yes", "content_base64": "eA=="}]},
        r"attachment file name contains a line break",
    ),
    (
        "filename U+2029",
        {"attachments": [{"filename": "a\u2029.txt", "content_base64": "eA=="}]},
        r"attachment file name contains a line break",
    ),
    ("in_reply_to word", {"in_reply_to": f"<{b_word(EVIL)}@example.test>"}, r"in_reply_to contains a line"),
    ("in_reply_to CRLF", {"in_reply_to": f"<a@example.test>{CRLF_BCC}"}, r"in_reply_to contains a line"),
    ("references word", {"references": [f"<{b_word(EVIL)}@example.test>"]}, r"references contains a line"),
]


def carrier_mcp(config: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "carrier", "mcp", "--config", str(config)],
        cwd=str(REPO),
        env={"PYTHONUNBUFFERED": "1"},
    )


def text_of(result: CallToolResult) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.fixture(scope="module")
def layout(sandbox: Sandbox) -> Layout:
    return sandbox.layout


@pytest.fixture(scope="module")
def config_path(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(sandbox, tmp_path_factory.mktemp("mail-injection"))


def hostile_original(tag: str, subject: str, from_name: str, references: str = "") -> bytes:
    """A mail from ops@ to carrier@ with raw (already encoded) header values, as an attacker sends it."""
    lines = [
        f"From: {from_name} <{OPS}>",
        f"To: {address('carrier')}",
        f"Subject: {subject}",
        "Date: Mon, 06 Jan 2025 10:00:00 +0000",
        f"Message-ID: <{token('orig-')}@example.test>",
        *([f"References: {references}"] if references else []),
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"original {tag}",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def original_uid(layout: Layout, tag: str) -> int:
    with imap_as(layout, "carrier") as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["BODY", f"original {tag}"])
        return int(uid)


def delivered(layout: Layout, identity: str, folder: str, tag: str) -> list[email.message.EmailMessage]:
    """Every message in ``identity``'s ``folder`` whose text holds ``tag``, parsed."""
    with imap_as(layout, identity) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["TEXT", tag])
        raw = client.fetch(uids, ["BODY.PEEK[]"]) if uids else {}
    return [email.message_from_bytes(raw[uid][b"BODY[]"], policy=default) for uid in uids]  # type: ignore[misc]


def assert_clean(message: email.message.EmailMessage) -> None:
    """Only the headers Carrier writes, each one line; no forged body. Text from the corpus may show
    only inside the one display name of the one recipient (as a quoted name, not a header)."""
    names = {name.lower() for name in message}
    assert not names & {"reply-to", "bcc", "x-injected"}, message.keys()
    assert b"FORGED" not in message.as_bytes()
    assert [a.addr_spec for a in message["To"].addresses] == [OPS]
    assert [a.addr_spec for a in message["From"].addresses] == [address("carrier")]
    for name, value in message.items():
        assert name == "To" or "evil" not in str(value), (name, value)


@pytest.fixture(scope="module")
def session(config_path: Path, layout: Layout) -> dict[str, Any]:
    """One stdio session: the send corpus, an honest send, and mail_reply on hostile originals."""
    tag = token("inj-")
    # Originals an attacker mailed in. Carrier decodes their headers once when it reads them, so a
    # doubly encoded value reaches compose as an encoded word again.
    deliver(layout, hostile_original(f"{tag}-subject", b_word(b_word(EVIL)), "Ops"), sender=OPS,
            to=[address("carrier")])
    deliver(layout, hostile_original(f"{tag}-name", "status", b_word(b_word("Ops" + CRLF_BCC))), sender=OPS,
            to=[address("carrier")])
    deliver(layout, hostile_original(f"{tag}-single", "status", b_word("Ops" + CRLF_BCC)), sender=OPS,
            to=[address("carrier")])
    evil_ref = f"<{b_word(EVIL)}@example.test>"
    deliver(layout, hostile_original(f"{tag}-refs", "status", "Ops", f"<root@example.test> {evil_ref}"),
            sender=OPS, to=[address("carrier")])
    deliver(layout, hostile_original(f"{tag}-plain", "plain", "Ops"), sender=OPS, to=[address("carrier")])
    originals = ("subject", "name", "single", "refs", "plain")
    uids = {name: original_uid(layout, f"{tag}-{name}") for name in originals}
    results: dict[str, CallToolResult] = {}

    async def run() -> None:
        async with Client(carrier_mcp(config_path)) as client:
            for case, args, _ in SEND_CORPUS:
                call = {"to": [OPS], "subject": f"{tag} {case}", "body": f"{tag} send {case}", **args}
                results[f"send {case}"] = await client.call_tool("mail_send", call)
            results["send honest"] = await client.call_tool(
                "mail_send",
                {
                    "to": [f"{b_word('Jörg Ops')} <{OPS}>"],
                    "subject": f"{tag} {q_word('Grüße')}",
                    "body": f"{tag} send honest",
                    "attachments": [{"filename": "report €.txt", "content_base64": "eA=="}],
                },
            )
            for name in ("subject", "name", "single", "refs"):
                results[f"reply {name}"] = await client.call_tool(
                    "mail_reply", {"uid": uids[name], "body": f"{tag} reply {name}"}
                )
            results["reply filename"] = await client.call_tool(
                "mail_reply",
                {
                    "uid": uids["plain"],
                    "body": f"{tag} reply filename",
                    "attachments": [{"filename": b_word("r.txt" + CRLF_BCC), "content_base64": "eA=="}],
                },
            )
            results["reply to_override"] = await client.call_tool(
                "mail_reply",
                {"uid": uids["plain"], "body": f"{tag} reply override", "to_override": [
                    f"{q_word('Ops' + CRLF_BCC)} <{OPS}>"]},
            )

    anyio.run(run)
    return {"tag": tag, "results": results}


@pytest.mark.parametrize(
    ("case", "fragment"), [(c, f) for c, _, f in SEND_CORPUS], ids=[c for c, _, _ in SEND_CORPUS]
)
def test_mail_send_refuses_each_hostile_header(session: dict[str, Any], case: str, fragment: str) -> None:
    result: CallToolResult = session["results"][f"send {case}"]
    text = text_of(result)
    assert result.is_error, f"{case} was accepted: {text}"
    assert text.startswith("Error executing tool mail_send: ") and "Traceback" not in text
    assert re.search(fragment, text), text
    assert "header injection is refused" in text


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("subject", r"subject contains a line break .*once its RFC 2047"),
        ("name", r"display name of ops@example\.test contains a line break .*once its RFC 2047"),
        ("filename", r"attachment file name contains a line break"),
        ("to_override", r"to_override contains a line break"),
    ],
)
def test_mail_reply_refuses_hostile_headers(session: dict[str, Any], case: str, fragment: str) -> None:
    result: CallToolResult = session["results"][f"reply {case}"]
    text = text_of(result)
    assert result.is_error, f"reply {case} was accepted: {text}"
    assert text.startswith("Error executing tool mail_reply: ") and "Traceback" not in text
    assert re.search(fragment, text), text


def test_a_reply_drops_an_encoded_word_reference_and_stays_clean(
    session: dict[str, Any], layout: Layout
) -> None:
    result: CallToolResult = session["results"]["reply refs"]
    assert not result.is_error, text_of(result)
    (reply,) = delivered(layout, "ops", "INBOX", f"{session['tag']} reply refs")
    assert_clean(reply)
    assert "<root@example.test>" in str(reply["References"]) and "=?" not in str(reply["References"])


def test_a_reply_to_a_once_encoded_hostile_name_answers_one_line_name(
    session: dict[str, Any], layout: Layout
) -> None:
    # Carrier reads the sender's name decoded and unfolded ("Ops Bcc: evil@evil.test"): a name,
    # never a header. The reply goes out to ops@ alone with that quoted name.
    result: CallToolResult = session["results"]["reply single"]
    assert not result.is_error, text_of(result)
    (reply,) = delivered(layout, "ops", "INBOX", f"{session['tag']} reply single")
    assert_clean(reply)
    assert reply["To"].addresses[0].display_name == "Ops Bcc: evil@evil.test"


def test_nothing_injected_reaches_dovecot(session: dict[str, Any], layout: Layout) -> None:
    tag = session["tag"]
    assert not session["results"]["send honest"].is_error, text_of(session["results"]["send honest"])
    inbox = delivered(layout, "ops", "INBOX", tag)
    sent = delivered(layout, "carrier", "Sent", tag)
    # Exactly the three accepted mails arrived (the honest send, the reply that dropped a bad
    # reference, the reply to a flattened name): each refused case left nothing in INBOX or Sent.
    assert sorted(m.get_body(("plain",)).get_content().strip() for m in inbox) == [  # type: ignore[union-attr]
        f"{tag} reply refs",
        f"{tag} reply single",
        f"{tag} send honest",
    ]
    assert len(sent) == 3
    for message in [*inbox, *sent]:
        assert_clean(message)
    honest = next(m for m in inbox if "send honest" in m.as_string())
    assert honest["Subject"] == f"{tag} Grüße"
    assert honest["To"].addresses[0].display_name == "Jörg Ops"
    (attachment,) = honest.iter_attachments()
    assert attachment.get_filename() == "report €.txt"
    with imap_as(layout, "ops") as client:  # and nothing from the corpus anywhere in the mailbox
        client.select_folder("INBOX", readonly=True)
        assert client.search(["HEADER", "Reply-To", "evil.test"]) == []
        assert client.search(["HEADER", "X-Injected", ""]) == []
        assert client.search(["BODY", "FORGED BODY"]) == []
