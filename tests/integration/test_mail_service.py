"""The mail layer against the sandbox's real Dovecot and SMTP: pool behaviour, the ten operations,
charsets, caps and bad input. What the tools changed is checked from a second IMAP connection."""

from __future__ import annotations

import base64
import email
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest
from imapclient import IMAPClient
from mail_support import (
    TcpProxy,
    deliver,
    find_uids,
    imap_as,
    simple_message,
    token,
    write_config,
)

from carrier.config import Config, load_config
from carrier.mail import imap
from carrier.mail.connect import MailConnectError
from carrier.mail.imap import ImapPool, MailConnectionLost, MailError, MailInputError, MailNotFound
from carrier.mail.records import Address
from carrier.mail.service import AttachmentInput, MailService
from carrier.sandbox.layout import Layout, address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def proxy(sandbox: Sandbox) -> Iterator[TcpProxy]:
    tcp = TcpProxy(("127.0.0.1", sandbox.layout.ports.imap))
    yield tcp
    tcp.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mail-service")


@pytest.fixture(scope="module")
def config(sandbox: Sandbox, workdir: Path, proxy: TcpProxy) -> Config:
    return load_config(write_config(sandbox, workdir, proxy_port=proxy.port), {})


@pytest.fixture(scope="module")
def mail(config: Config) -> Iterator[MailService]:
    service = MailService(config)
    yield service
    service.close()


@pytest.fixture(scope="module")
def layout(sandbox: Sandbox) -> Layout:
    return sandbox.layout


@pytest.fixture
def folder(layout: Layout) -> Iterator[str]:
    """A fresh folder of carrier@, so counts and order are this test's own."""
    name = token("Test-")
    with imap_as(layout, "carrier") as client:
        client.create_folder(name)
    yield name
    with imap_as(layout, "carrier") as client:
        client.delete_folder(name)


def append(
    layout: Layout,
    folder: str,
    messages: list[EmailMessage],
    *,
    dates: list[datetime] | None = None,
    flags: tuple[bytes, ...] = (),
) -> list[int]:
    uids = []
    with imap_as(layout, "carrier") as client:
        for i, msg in enumerate(messages):
            when = dates[i] if dates else None
            response = client.append(folder, msg.as_bytes(), flags=flags, msg_time=when)
            uids.append(int(response.split(b"]")[0].split()[-1]))  # [APPENDUID validity uid]
    return uids


# --------------------------------------------------------------------------------------------
# Folders and listing
# --------------------------------------------------------------------------------------------


def test_folder_list_names_special_use_and_selectable(mail: MailService, folder: str) -> None:
    listing = mail.folder_list()
    by_name = {f.name: f for f in listing.folders}
    assert listing.account == "carrier"
    assert by_name["Sent"].special_use == "\\Sent" and by_name["Trash"].special_use == "\\Trash"
    assert by_name["INBOX"].selectable and by_name["INBOX"].delimiter == "/"
    assert folder in by_name


def test_non_ascii_folder_names_round_trip_modified_utf7(mail: MailService, layout: Layout) -> None:
    name = token("Entwürfe-中文-")
    with imap_as(layout, "carrier") as client:
        client.create_folder(name)
        client.append(name, simple_message("in utf7 folder").as_bytes())
    try:
        assert name in [f.name for f in mail.folder_list().folders]
        page = mail.inbox_list(folder=name)
        assert [m.subject for m in page.messages] == ["in utf7 folder"]
    finally:
        with imap_as(layout, "carrier") as client:
            client.delete_folder(name)


def test_list_pages_newest_first_with_cursor_and_marks_nothing_read(
    mail: MailService, layout: Layout, folder: str
) -> None:
    uids = append(layout, folder, [simple_message(f"m{i}") for i in range(1, 8)])
    first = mail.inbox_list(folder=folder, limit=3)
    assert first.total == 7 and [m.subject for m in first.messages] == ["m7", "m6", "m5"]
    assert [m.uid for m in first.messages] == uids[::-1][:3]
    second = mail.inbox_list(folder=folder, limit=3, cursor=first.next_cursor)
    assert [m.subject for m in second.messages] == ["m4", "m3", "m2"]
    third = mail.inbox_list(folder=folder, limit=3, cursor=second.next_cursor)
    assert [m.subject for m in third.messages] == ["m1"] and third.next_cursor is None
    summary = first.messages[0]
    assert summary.from_ == [Address(name="Ops", addr="ops@example.test")] and summary.unread
    assert summary.date == "2025-01-06T10:00:00+00:00" and summary.size > 0
    with imap_as(layout, "carrier") as client:
        client.select_folder(folder, readonly=True)
        assert client.search(["SEEN"]) == []  # BODY.PEEK: listing marked nothing read


def test_cursor_survives_expunges_above_it(mail: MailService, layout: Layout, folder: str) -> None:
    uids = append(layout, folder, [simple_message(f"m{i}") for i in range(1, 8)])
    first = mail.inbox_list(folder=folder, limit=3)
    with imap_as(layout, "carrier") as client:  # sequence numbers shift under the cursor
        client.select_folder(folder)
        client.delete_messages([uids[6], uids[0]])
        client.expunge()
    second = mail.inbox_list(folder=folder, limit=3, cursor=first.next_cursor)
    assert [m.subject for m in second.messages] == ["m4", "m3", "m2"]
    assert second.next_cursor is None


def test_a_reused_connection_sees_mail_that_arrived_or_left_meanwhile(
    mail: MailService, layout: Layout, folder: str
) -> None:
    append(layout, folder, [simple_message("one")])
    assert [m.subject for m in mail.inbox_list(folder=folder).messages] == ["one"]
    opened = mail.pool(mail.account(None)).opened
    (second,) = append(layout, folder, [simple_message("two")])  # the pooled connection keeps it open
    page = mail.inbox_list(folder=folder)
    assert [m.subject for m in page.messages] == ["two", "one"] and page.total == 2
    assert mail.inbox_read(uid=second, folder=folder).subject == "two"
    with imap_as(layout, "carrier") as client:
        client.select_folder(folder)
        client.delete_messages([second])
        client.expunge()
    page = mail.inbox_list(folder=folder)
    assert [m.subject for m in page.messages] == ["one"] and page.total == 1
    assert mail.pool(mail.account(None)).opened == opened  # one connection, kept open throughout


def test_unread_only_and_since_filter_the_listing(mail: MailService, layout: Layout, folder: str) -> None:
    dates = [
        datetime(2024, 1, 10, tzinfo=UTC),
        datetime(2024, 6, 10, tzinfo=UTC),
        datetime(2024, 9, 1, tzinfo=UTC),
    ]
    uids = append(layout, folder, [simple_message(s) for s in ("old", "mid", "new")], dates=dates)
    with imap_as(layout, "carrier") as client:
        client.select_folder(folder)
        client.add_flags([uids[2]], [b"\\Seen"])
    unread = mail.inbox_list(folder=folder, unread_only=True)
    assert [m.subject for m in unread.messages] == ["mid", "old"] and unread.total == 2
    recent = mail.inbox_list(folder=folder, since="2024-06-01")
    assert [m.subject for m in recent.messages] == ["new", "mid"]
    paged = mail.inbox_list(folder=folder, since="2024-01-01", limit=2)
    rest = mail.inbox_list(folder=folder, since="2024-01-01", limit=2, cursor=paged.next_cursor)
    assert [m.subject for m in paged.messages + rest.messages] == ["new", "mid", "old"]


def test_listing_an_empty_folder(mail: MailService, folder: str) -> None:
    page = mail.inbox_list(folder=folder)
    assert (page.total, page.messages, page.next_cursor) == (0, [], None)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _multipart(subject: str) -> EmailMessage:
    msg = simple_message(subject, "plain text body\nsecond line")
    msg.add_alternative("<html><body><h1>Title</h1><p>html <b>body</b></p></body></html>", subtype="html")
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="report €.pdf")
    msg.add_attachment("notes ü".encode(), maintype="text", subtype="plain", filename="notes.txt")
    return msg


def test_read_text_html_and_raw_eml(mail: MailService, layout: Layout, folder: str) -> None:
    (uid,) = append(layout, folder, [_multipart("multi")])
    text = mail.inbox_read(uid=uid, folder=folder)
    assert text.format == "text" and text.body.strip() == "plain text body\nsecond line"
    assert [(a.index, a.filename, a.mime_type) for a in text.attachments] == [
        (0, "report €.pdf", "application/pdf"),
        (1, "notes.txt", "text/plain"),
    ]
    assert text.subject == "multi" and text.from_[0].addr == "ops@example.test" and not text.truncated
    html = mail.inbox_read(uid=uid, folder=folder, format="html")
    assert html.format == "html" and "<b>body</b>" in html.body
    raw = mail.inbox_read(uid=uid, folder=folder, format="raw_eml")
    assert raw.body.startswith("From: Ops <ops@example.test>") and "report" in raw.body
    with imap_as(layout, "carrier") as client:
        client.select_folder(folder, readonly=True)
        assert client.search(["SEEN"]) == []  # reading does not mark read


def test_html_only_mail_reads_as_converted_text(mail: MailService, layout: Layout, folder: str) -> None:
    msg = simple_message("html only")
    msg.set_content(
        "<p>Hello <a href='https://example.test/x'>there</a></p><script>x()</script>", subtype="html"
    )
    (uid,) = append(layout, folder, [msg])
    read = mail.inbox_read(uid=uid, folder=folder)
    assert read.body == "Hello there <https://example.test/x>" and read.format == "text"


def test_an_empty_text_part_falls_back_to_the_html(mail: MailService, layout: Layout, folder: str) -> None:
    msg = simple_message("empty text", "")
    msg.add_alternative("<p>the real <i>content</i></p>", subtype="html")
    (uid,) = append(layout, folder, [msg])
    assert mail.inbox_read(uid=uid, folder=folder).body == "the real content"


@pytest.mark.parametrize(
    ("charset", "payload", "expected"),
    [
        ("gbk", "你好世界".encode("gbk"), "你好世界"),
        ("iso-8859-1", "Grüße".encode("latin-1"), "Grüße"),
        ("x-broken-charset", "fine ü".encode(), "fine ü"),
        ("utf-8", b"bad \xff byte", "bad \ufffd byte"),
    ],
)
def test_inbound_charsets_through_the_real_mx(
    mail: MailService, layout: Layout, charset: str, payload: bytes, expected: str
) -> None:
    subject = token("charset-")
    data = (
        f"From: ops@example.test\r\nTo: carrier@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.test>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + base64.encodebytes(payload)
    deliver(layout, data, sender=address("ops"), to=[address("carrier")])
    (uid,) = find_uids(layout, "carrier", "INBOX", subject)
    assert mail.inbox_read(uid=uid).body.strip() == expected


def test_long_bodies_are_read_in_windows(mail: MailService, layout: Layout, folder: str) -> None:
    body = "".join(f"line {i:04d}\n" for i in range(1000))  # 10,000 characters
    (uid,) = append(layout, folder, [simple_message("long", body)])
    first = mail.inbox_read(uid=uid, folder=folder, max_chars=4000)
    assert first.truncated and len(first.body) == 4000 and first.body_chars == len(body)
    rest = mail.inbox_read(uid=uid, folder=folder, max_chars=8000, offset=4000)
    assert not rest.truncated and first.body + rest.body == body
    assert mail.inbox_read(uid=uid, folder=folder, offset=50_000).body == ""


def test_messages_over_20_mb_are_refused_and_the_pool_stays_usable(
    mail: MailService, layout: Layout, folder: str
) -> None:
    big = simple_message("huge")
    big.add_attachment(
        os.urandom(16 * 1024 * 1024), maintype="application", subtype="octet-stream", filename="blob.bin"
    )  # ~21.6 MB once base64-encoded
    (uid,) = append(layout, folder, [big])
    with pytest.raises(MailError, match="over the 20 MB reading cap"):
        mail.inbox_read(uid=uid, folder=folder)
    with pytest.raises(MailError, match="over the 5242880-byte cap: pass save_to"):
        mail.attachment_get(uid=uid, attachment_index=0, folder=folder)
    assert mail.inbox_list(folder=folder).messages[0].subject == "huge"


# --------------------------------------------------------------------------------------------
# Attachments
# --------------------------------------------------------------------------------------------


def test_attachment_as_base64_and_saved_to_the_download_dir(
    mail: MailService, layout: Layout, folder: str, config: Config
) -> None:
    (uid,) = append(layout, folder, [_multipart("files")])
    got = mail.attachment_get(uid=uid, attachment_index=0, folder=folder)
    assert base64.b64decode(got.content_base64 or "") == b"%PDF-1.4 fake" and got.saved_to is None
    assert (got.filename, got.mime_type, got.size) == ("report €.pdf", "application/pdf", 13)
    saved = mail.attachment_get(uid=uid, attachment_index=1, folder=folder, save_to="")
    assert config.mail.download_dir is not None
    assert saved.content_base64 is None and saved.saved_to == str(
        config.mail.download_dir.resolve() / "notes.txt"
    )
    assert Path(saved.saved_to).read_bytes() == "notes ü".encode()
    assert Path(saved.saved_to).stat().st_mode & 0o777 == 0o600
    again = mail.attachment_get(uid=uid, attachment_index=1, folder=folder, save_to=".")
    assert again.saved_to and again.saved_to.endswith("notes (1).txt")  # never overwritten
    named = mail.attachment_get(uid=uid, attachment_index=0, folder=folder, save_to=f"{token()}.pdf")
    assert named.saved_to and Path(named.saved_to).read_bytes() == b"%PDF-1.4 fake"


@pytest.mark.parametrize("save_to", ["../escape.pdf", "/etc/carrier-test.pdf", "sub/../../x"])
def test_attachment_save_to_outside_the_download_dir_is_refused(
    mail: MailService, layout: Layout, folder: str, save_to: str
) -> None:
    (uid,) = append(layout, folder, [_multipart("files")])
    with pytest.raises(MailInputError, match="outside the download directory"):
        mail.attachment_get(uid=uid, attachment_index=0, folder=folder, save_to=save_to)
    assert not Path("/etc/carrier-test.pdf").exists()


def test_attachment_index_out_of_range(mail: MailService, layout: Layout, folder: str) -> None:
    (uid,) = append(layout, folder, [_multipart("files")])
    with pytest.raises(MailInputError, match=r"attachment_index 2 is out of range: .* has 2 attachment\(s\)"):
        mail.attachment_get(uid=uid, attachment_index=2, folder=folder)


# --------------------------------------------------------------------------------------------
# Search and threads
# --------------------------------------------------------------------------------------------


def test_search_with_criteria_and_filters(mail: MailService, layout: Layout, folder: str) -> None:
    tag = token()
    append(
        layout,
        folder,
        [
            simple_message(f"{tag} invoice march", sender="ops"),
            simple_message(f"{tag} invoice april", sender="admin"),
            simple_message(f"{tag} Grüße aus Köln", sender="admin"),
            simple_message("unrelated"),
        ],
    )
    found = mail.search(query=f'SUBJECT "{tag} invoice"', folder=folder)
    assert [m.subject for m in found.messages] == [f"{tag} invoice april", f"{tag} invoice march"]
    assert found.total == 2
    by_sender = mail.search(query="SUBJECT invoice", folder=folder, from_="admin@example.test")
    assert [m.subject for m in by_sender.messages] == [f"{tag} invoice april"]
    assert mail.search(folder=folder, subject="Köln").messages[0].subject == f"{tag} Grüße aus Köln"
    assert mail.search(folder=folder, subject="invoice", limit=1).total == 2
    assert len(mail.search(folder=folder, subject="invoice", limit=1).messages) == 1
    assert mail.search(folder=folder, unseen=False).total == 0
    assert mail.search(folder=folder, since="2000-01-01", before="2999-01-01").total == 4


def test_search_criteria_the_server_rejects_are_a_clear_error(mail: MailService, folder: str) -> None:
    with pytest.raises(MailInputError, match="the server refused the search criteria 'FROBNICATE 3'"):
        mail.search(query="FROBNICATE 3", folder=folder)
    assert mail.search(query="ALL", folder=folder).total == 0  # the pooled connection is fine


@pytest.mark.parametrize(
    "query", ["ALL\r\nA1 LOGOUT", "SUBJECT {4}\r\ntest", "SUBJECT {4+}", "SUBJECT x\nUNSEEN"]
)
def test_search_with_crlf_or_literals_is_refused_before_the_wire(mail: MailService, query: str) -> None:
    with pytest.raises(MailInputError, match=r"CR, LF or NUL|literal"):
        mail.search(query=query)
    with pytest.raises(MailInputError, match="CR, LF or NUL"):
        mail.search(subject="a\r\nb")


def test_thread_gathers_ancestors_and_replies_oldest_first(mail: MailService, layout: Layout) -> None:
    t = token()
    ids = {k: f"<{k}-{t}@example.test>" for k in "abcde"}
    root = simple_message(f"{t} root", message_id=ids["a"])
    root.replace_header("Date", "Mon, 06 Jan 2025 09:00:00 +0000")
    b = simple_message(f"Re: {t} root", message_id=ids["b"], In_Reply_To=ids["a"], References=ids["a"])
    b.replace_header("Date", "Mon, 06 Jan 2025 10:00:00 +0000")
    c = simple_message(
        f"Re: {t} root", message_id=ids["c"], In_Reply_To=ids["b"], References=f"{ids['a']} {ids['b']}"
    )
    c.replace_header("Date", "Mon, 06 Jan 2025 11:00:00 +0000")
    d = simple_message(f"{t} other", message_id=ids["d"])
    e = simple_message(f"Re: {t} root", message_id=ids["e"], In_Reply_To=ids["c"])  # no References at all
    e.replace_header("Date", "Mon, 06 Jan 2025 12:00:00 +0000")
    for msg in (e, c, d, root, b):  # arrival order differs from date order
        deliver(layout, msg, sender=address("ops"), to=[address("carrier")])
    thread = mail.thread(message_id=ids["b"])
    assert [m.message_id for m in thread.messages] == [ids["a"], ids["b"], ids["c"], ids["e"]]
    assert thread.root_message_id == ids["a"]
    assert [m.message_id for m in mail.thread(message_id=ids["d"]).messages] == [ids["d"]]
    assert len(mail.thread(message_id=ids["a"], limit=2).messages) == 2
    with pytest.raises(MailNotFound, match="no message with Message-ID"):
        mail.thread(message_id=f"<missing-{t}@example.test>")
    with pytest.raises(MailInputError, match="is not a Message-ID"):
        mail.thread(message_id="not an id")


# --------------------------------------------------------------------------------------------
# Move and mark, checked from a second connection
# --------------------------------------------------------------------------------------------


def test_move_with_move_and_with_the_copy_expunge_fallback(
    mail: MailService, layout: Layout, folder: str
) -> None:
    first, second = append(layout, folder, [simple_message("to archive"), simple_message("by fallback")])
    target = token("Dest-")
    with imap_as(layout, "carrier") as client:
        client.create_folder(target)
    try:
        moved = mail.move(uid=first, from_folder=folder, to_folder=target)
        assert moved.method == "MOVE" and moved.new_uid is not None
        with mail.pool(mail.account(None)).connection() as client:  # MOVE-less servers: same result
            imap.select(client, folder, readonly=False)
            new_uid, method = imap.move_message(client, second, target, use_move=False)
        assert method == "COPY+EXPUNGE" and new_uid is not None
        with imap_as(layout, "carrier") as client:
            client.select_folder(folder, readonly=True)
            assert client.search("ALL") == []
            client.select_folder(target, readonly=True)
            fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
            subjects = sorted(v[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode().strip() for v in fetched.values())
            assert subjects == ["Subject: by fallback", "Subject: to archive"]
            assert sorted(fetched) == sorted([moved.new_uid, new_uid])
    finally:
        with imap_as(layout, "carrier") as client:
            client.delete_folder(target)


def test_move_bad_input(mail: MailService, layout: Layout, folder: str) -> None:
    (uid,) = append(layout, folder, [simple_message("stay")])
    with pytest.raises(MailNotFound, match="to_folder 'Nowhere' does not exist"):
        mail.move(uid=uid, from_folder=folder, to_folder="Nowhere")
    with pytest.raises(MailNotFound, match=f"no message with uid {uid + 100}"):
        mail.move(uid=uid + 100, from_folder=folder, to_folder="Archive")
    with pytest.raises(MailInputError, match="nothing to move"):
        mail.move(uid=uid, from_folder=folder, to_folder=folder)
    with pytest.raises(MailNotFound, match="cannot open folder 'Nowhere'"):
        mail.move(uid=uid, from_folder="Nowhere", to_folder="Archive")
    assert mail.inbox_list(folder=folder).total == 1


def test_mark_flags_and_special_use_moves(mail: MailService, layout: Layout, folder: str) -> None:
    uid, other = append(layout, folder, [simple_message("flag me"), simple_message("trash me")])

    def flags() -> set[bytes]:
        with imap_as(layout, "carrier") as client:
            client.select_folder(folder, readonly=True)
            return set(client.get_flags([uid])[uid])

    assert "\\Seen" in mail.mark(uid=uid, action="read", folder=folder).flags and b"\\Seen" in flags()
    assert b"\\Seen" not in (mail.mark(uid=uid, action="unread", folder=folder), flags())[1]
    assert b"\\Flagged" in (mail.mark(uid=uid, action="flagged", folder=folder), flags())[1]
    assert b"\\Flagged" not in (mail.mark(uid=uid, action="unflagged", folder=folder), flags())[1]
    trashed = mail.mark(uid=other, action="trash", folder=folder)
    assert trashed.moved_to == "Trash" and trashed.new_uid is not None
    archived = mail.mark(uid=uid, action="archive", folder=folder)
    assert archived.moved_to == "Archive"
    with imap_as(layout, "carrier") as client:
        client.select_folder(folder, readonly=True)
        assert client.search("ALL") == []
        client.select_folder("Trash", readonly=True)
        assert trashed.new_uid in client.search("ALL")
    with pytest.raises(MailInputError, match="already in 'Trash'"):
        mail.mark(uid=trashed.new_uid, action="trash", folder="Trash")


# --------------------------------------------------------------------------------------------
# Sending and replying
# --------------------------------------------------------------------------------------------


def _received(layout: Layout, identity: str, subject_token: str) -> email.message.EmailMessage:
    with imap_as(layout, identity) as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["SUBJECT", subject_token])
        data = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    parsed = email.message_from_bytes(data, policy=default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_send_delivers_with_guaranteed_headers_and_saves_to_sent(
    mail: MailService, layout: Layout, config: Config
) -> None:
    tag = token()
    assert config.mail.download_dir is not None
    config.mail.download_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (config.mail.download_dir / f"{tag}.csv").write_bytes(b"a,b\n1,2\n")
    result = mail.send(
        to=["Ops <ops@example.test>"],
        cc="admin@example.test",
        bcc=["newbie@example.test"],
        subject=f"{tag} Grüße € 中文",
        body="Hallo 中文 €",
        body_html="<p>Hallo <b>中文</b></p>",
        attachments=[
            AttachmentInput(path=f"{tag}.csv"),
            AttachmentInput(filename="b.bin", content_base64=base64.b64encode(b"\x00\x01").decode()),
        ],
    )
    assert result.saved_to == "Sent" and result.warning is None
    assert result.recipients == ["ops@example.test", "admin@example.test", "newbie@example.test"]
    got = _received(layout, "ops", tag)
    assert got["Message-ID"] == result.message_id and result.message_id.endswith("@example.test>")
    assert got["From"] == "Carrier <carrier@example.test>" and got["To"] == "Ops <ops@example.test>"
    assert got["Cc"] == "admin@example.test" and got["Bcc"] is None  # Bcc never goes out
    assert got["Subject"] == f"{tag} Grüße € 中文"
    assert got["MIME-Version"] == "1.0" and got["User-Agent"].startswith("carrier/")
    assert got["Date"].datetime.utcoffset().total_seconds() == 0
    assert got.get_content_type() == "multipart/mixed"
    body = got.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content().strip() == "Hallo 中文 €"
    files = {p.get_filename(): p.get_content() for p in got.iter_attachments()}
    assert files == {f"{tag}.csv": "a,b\n1,2\n", "b.bin": b"\x00\x01"}
    assert find_uids(layout, "newbie", "INBOX", tag) and find_uids(layout, "admin", "INBOX", tag)
    with imap_as(layout, "carrier") as client:
        client.select_folder("Sent", readonly=True)
        (uid,) = client.search(["HEADER", "Message-ID", result.message_id])
        assert b"\\Seen" in client.get_flags([uid])[uid]
        saved = client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS (BCC)]"])[uid]
        assert b"newbie@example.test" in saved[b"BODY[HEADER.FIELDS (BCC)]"]  # the Sent copy keeps Bcc


def test_send_bad_input(mail: MailService, config: Config) -> None:
    with pytest.raises(MailInputError, match="is not an email address"):
        mail.send(to="nobody", subject="x", body="y")
    with pytest.raises(MailInputError, match="subject contains a line break"):
        mail.send(to="ops@example.test", subject="x\r\nBcc: a@b.test", body="y")
    with pytest.raises(MailInputError, match="outside the download directory"):
        mail.send(
            to="ops@example.test", subject="x", body="y", attachments=[AttachmentInput(path="/etc/passwd")]
        )
    with pytest.raises(MailInputError, match="not valid base64"):
        mail.send(
            to="ops@example.test",
            subject="x",
            body="y",
            attachments=[AttachmentInput(filename="a", content_base64="***")],
        )
    with pytest.raises(MailInputError, match="either content_base64"):
        mail.send(to="ops@example.test", subject="x", body="y", attachments=[AttachmentInput(filename="a")])


def test_reply_all_threads_and_leaves_out_self(mail: MailService, layout: Layout) -> None:
    tag = token()
    original = simple_message(
        f"{tag} question",
        "Can you check?",
        message_id=f"<q-{tag}@example.test>",
        Cc="Admin <admin@example.test>, carrier@example.test",
        References=f"<root-{tag}@example.test>",
    )
    deliver(layout, original, sender=address("ops"), to=[address("carrier"), address("admin")])
    (uid,) = find_uids(layout, "carrier", "INBOX", tag)
    result = mail.reply(uid=uid, body="Checked: all fine.", reply_all=True)
    assert result.recipients == ["ops@example.test", "admin@example.test"]
    got = _received(layout, "ops", f"Re: {tag}")
    assert got["Subject"] == f"Re: {tag} question"
    assert got["In-Reply-To"] == f"<q-{tag}@example.test>"
    assert got["References"] == f"<root-{tag}@example.test> <q-{tag}@example.test>"
    assert got["To"] == "Ops <ops@example.test>" and got["Cc"] == "Admin <admin@example.test>"
    with imap_as(layout, "carrier") as client:
        client.select_folder("INBOX", readonly=True)
        assert b"\\Answered" in client.get_flags([uid])[uid]
    again = mail.reply(uid=uid, body="only to admin", to_override="admin@example.test")
    assert again.recipients == ["admin@example.test"]
    assert len(find_uids(layout, "admin", "INBOX", f"Re: {tag}")) == 2
    assert len(find_uids(layout, "ops", "INBOX", f"Re: {tag}")) == 1


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


def test_pool_reuses_one_logged_in_connection(config: Config) -> None:
    service = MailService(config)
    try:
        for _ in range(5):
            service.folder_list()
            service.inbox_list(limit=1)
        pool = service.pool(service.account(None))
        assert (pool.opened, pool.discarded, pool.idle_count) == (1, 0, 1)
    finally:
        service.close()
    assert pool.idle_count == 0
    with pytest.raises(MailError, match="pool of account carrier is closed"):
        pool.run(imap.list_folders, what="after close")


def test_pool_caps_connections_under_concurrent_calls(config: Config) -> None:
    pool = ImapPool(config.default_account, max_connections=2)
    errors: list[BaseException] = []
    peak = [0]
    lock = threading.Lock()
    inside = [0]
    pair = threading.Barrier(2, timeout=30)  # each call waits for a second one: two run at once

    def op(client: IMAPClient) -> None:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        client.noop()
        pair.wait()
        with lock:
            inside[0] -= 1

    def worker() -> None:
        try:
            for _ in range(3):
                pool.run(op, what="probe")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert errors == []
    assert peak[0] == 2 and pool.opened == 2


def test_noop_health_check_replaces_a_dead_idle_connection(config: Config, proxy: TcpProxy) -> None:
    pool = ImapPool(config.account("proxied"), noop_after=0.0)
    service = MailService(config, pool_factory=lambda account: pool)
    try:
        assert service.folder_list("proxied").folders
        proxy.drop_all()
        assert service.folder_list("proxied").folders  # NOOP failed, a new connection did the work
        assert (pool.opened, pool.discarded) == (2, 1)
    finally:
        service.close()


def test_read_is_retried_on_a_fresh_connection_after_a_drop(config: Config, proxy: TcpProxy) -> None:
    pool = ImapPool(config.account("proxied"), noop_after=3600.0)  # no NOOP: the drop hits the command
    service = MailService(config, pool_factory=lambda account: pool)
    try:
        service.inbox_list("proxied", limit=1)
        proxy.drop_all()
        assert service.inbox_list("proxied", limit=1).account == "proxied"
        assert (pool.opened, pool.discarded) == (2, 1)
    finally:
        service.close()


def test_change_interrupted_by_a_drop_says_so_and_the_pool_recovers(
    config: Config, proxy: TcpProxy, layout: Layout, folder: str
) -> None:
    (uid,) = append(layout, folder, [simple_message("mark me")])
    pool = ImapPool(config.account("proxied"), noop_after=3600.0)
    service = MailService(config, pool_factory=lambda account: pool)

    def flag_with_a_drop_in_the_middle(client: IMAPClient) -> None:
        client.select_folder(folder)
        proxy.drop_all()  # the server goes away between two commands of one change
        client.add_flags([uid], [b"\\Flagged"])

    try:
        with pytest.raises(MailConnectionLost, match=r"dropped mid-operation.*may or may not have been done"):
            pool.run(flag_with_a_drop_in_the_middle, what="mail_mark", retry=False)
        assert "\\Flagged" in service.mark("proxied", uid=uid, action="flagged", folder=folder).flags
        proxy.drop_all()  # between calls: a change NOOPs its connection first and gets a new one
        assert "\\Flagged" not in service.mark("proxied", uid=uid, action="unflagged", folder=folder).flags
        assert (pool.opened, pool.discarded) == (3, 2)
    finally:
        service.close()


def test_server_down_is_a_clear_error_and_service_resumes_when_it_is_back(
    config: Config, proxy: TcpProxy
) -> None:
    service = MailService(config)
    try:
        service.folder_list("proxied")
        proxy.accepting = False
        proxy.drop_all()
        with pytest.raises(MailConnectError, match=r"IMAP 127\.0\.0\.1:.* for account proxied"):
            service.folder_list("proxied")
        proxy.accepting = True
        assert service.folder_list("proxied").folders
    finally:
        proxy.accepting = True
        service.close()


def test_wrong_password_unknown_account_folder_and_uid(mail: MailService) -> None:
    with pytest.raises(MailConnectError, match=r"login as carrier@example\.test refused"):
        mail.folder_list("wrong")
    with pytest.raises(MailNotFound, match="no mail account named 'nope': the accounts are carrier, ops"):
        mail.inbox_list("nope")
    with pytest.raises(MailNotFound, match="cannot open folder 'No/Such'"):
        mail.inbox_list(folder="No/Such")
    with pytest.raises(MailNotFound, match="no message with uid 4000000000"):
        mail.inbox_read(uid=4_000_000_000)
    with pytest.raises(MailInputError, match="uid must be a positive whole number"):
        mail.inbox_read(uid="12 34")
    assert mail.folder_list().account == "carrier"  # every failure above left the pool usable
    assert mail.folder_list("ops").account == "ops"


def test_cursor_from_elsewhere_is_refused(mail: MailService, folder: str) -> None:
    with pytest.raises(MailInputError, match="cursor is not one this server gave out"):
        mail.inbox_list(folder=folder, cursor="garbage")
    with pytest.raises(MailInputError, match="UIDVALIDITY changed"):
        mail.inbox_list(folder=folder, cursor=f"c1.1.5.{uuid.uuid4().int % 1000}")


def test_idle_watcher_sees_new_mail(config: Config, layout: Layout) -> None:
    with imap.IdleWatcher(config.account("ops")) as watcher:
        assert watcher.wait(0.3) is False
        deliver(
            layout, simple_message(token("idle-"), to="ops"), sender=address("admin"), to=[address("ops")]
        )
        assert watcher.wait(10) is True
