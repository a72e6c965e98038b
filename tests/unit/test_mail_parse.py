"""Inbound parsing: any charset, broken input degrades to U+FFFD, typed addresses, attachment indexes."""

from __future__ import annotations

import base64

import pytest

from carrier.mail.htmltext import html_to_text
from carrier.mail.mime import Leaf, classify, codec_for, decode_text, param_value
from carrier.mail.parse import (
    decode_header_value,
    decode_transfer,
    header_date_iso,
    message_leaves,
    parse_addresses,
    parse_message,
    parse_message_ids,
)
from carrier.mail.records import Address


def raw(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode("ascii") + b"\r\n" + body


def single(charset: str, body: bytes, cte: str = "8bit") -> bytes:
    return raw(
        "From: a@example.test\nTo: b@example.test\nSubject: s\n"
        f"Content-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: {cte}\n",
        body,
    )


@pytest.mark.parametrize(
    ("charset", "body", "expected"),
    [
        ("utf-8", "Grüße € 中文".encode(), "Grüße € 中文"),
        ("iso-8859-1", "Grüße".encode("latin-1"), "Grüße"),
        ("iso-8859-1", b"5 \x80", "5 €"),  # windows-1252 mislabelled as latin-1, as senders do
        ("gbk", "中文邮件".encode("gbk"), "中文邮件"),
        ("gb2312", "中文".encode("gb2312"), "中文"),
        ("shift_jis", "日本語".encode("shift_jis"), "日本語"),
        ("koi8-r", "Привет".encode("koi8-r"), "Привет"),
        ("x-no-such-charset", "héllo".encode(), "héllo"),  # unknown label: UTF-8
        ("utf-8", b"bad \xff\xfe bytes", "bad \ufffd\ufffd bytes"),  # broken: replacement chars
        ('"utf-8"', "quoted ü".encode(), "quoted ü"),
    ],
)
def test_bodies_decode_in_any_charset_and_never_raise(charset: str, body: bytes, expected: str) -> None:
    assert parse_message(single(charset, body)).text.strip() == expected


def test_base64_and_quoted_printable_bodies() -> None:
    b64 = base64.b64encode("中文 body".encode("gbk"))
    assert parse_message(single("gbk", b64, "base64")).text.strip() == "中文 body"
    assert parse_message(single("utf-8", b"caf=C3=A9 =E2=82=AC", "quoted-printable")).text.strip() == "café €"


def test_broken_base64_decodes_what_it_can() -> None:
    assert decode_transfer(b"aGVs\r\nbG8=", "base64") == b"hello"
    assert decode_transfer(b"aGVsbG8", "base64") == b"hello"  # padding missing
    assert decode_transfer(b"aGVs!!bG8=*", "base64") == b"hello"  # junk characters
    assert decode_transfer(b"aGVsbG8gd", "base64") == b"hello "  # a dangling last character
    assert decode_transfer(b"", "base64") == b""


def test_encoded_word_headers_in_several_charsets() -> None:
    assert decode_header_value("=?utf-8?q?Gr=C3=BC=C3=9Fe_=E2=82=AC?=") == "Grüße €"
    assert decode_header_value("=?iso-8859-1?q?Gr=FC=DFe?=") == "Grüße"
    gbk = base64.b64encode("中文".encode("gbk")).decode()
    assert decode_header_value(f"=?gbk?b?{gbk}?=") == "中文"
    assert decode_header_value("=?x-bogus?q?caf=C3=A9?=") == "café"  # unknown charset: UTF-8 guess
    assert decode_header_value("=?utf-8?b?!!!notbase64?=").startswith("=?utf-8?b?")  # left readable
    assert decode_header_value("plain\r\n folded   text") == "plain folded text"
    assert decode_header_value(None) == ""


def test_raw_8bit_headers_are_read_as_utf8() -> None:
    data = "From: Jürgen <j@example.test>\r\nSubject: Grüße 中文\r\n\r\nbody\r\n".encode()
    parsed = parse_message(data)
    assert parsed.headers.subject == "Grüße 中文"
    assert parsed.headers.from_ == [Address(name="Jürgen", addr="j@example.test")]


def test_addresses_are_typed_and_encoded_names_decoded_after_splitting() -> None:
    values = [
        '=?utf-8?q?M=C3=BCller=2C_Hans?= <hans@example.test>, "Doe, Jane" <jane@example.test>',
        "bob@example.test",
        "undisclosed-recipients:;",
    ]
    assert parse_addresses(values) == [
        Address(name="Müller, Hans", addr="hans@example.test"),
        Address(name="Doe, Jane", addr="jane@example.test"),
        Address(name="", addr="bob@example.test"),
    ]
    assert parse_addresses(["garbage without at", None]) == []


def test_message_ids_and_dates() -> None:
    assert parse_message_ids("<a@x> <b@x>\r\n <a@x>") == ["<a@x>", "<b@x>"]
    assert parse_message_ids("bare@x.test") == ["<bare@x.test>"]
    assert parse_message_ids("no id here") == [] and parse_message_ids(None) == []
    assert header_date_iso("Mon, 06 Jan 2025 10:00:00 +0100") == "2025-01-06T10:00:00+01:00"
    assert header_date_iso("Mon, 06 Jan 2025 10:00:00 -0000") == "2025-01-06T10:00:00+00:00"
    assert header_date_iso("yesterday-ish") is None and header_date_iso(None) is None


MIXED = raw(
    "From: Ops <ops@example.test>\nTo: carrier@example.test\nSubject: =?utf-8?q?files_=E2=82=AC?=\n"
    "Message-ID: <m1@example.test>\nIn-Reply-To: <p@example.test>\n"
    "References: <r@example.test> <p@example.test>\n"
    "Date: Mon, 06 Jan 2025 10:00:00 +0000\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=OUT\n",
    b"--OUT\r\nContent-Type: multipart/alternative; boundary=IN\r\n\r\n"
    b"--IN\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain body\r\n"
    b"--IN\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html <b>body</b></p>\r\n--IN--\r\n"
    b'--OUT\r\nContent-Type: application/pdf; name="a.pdf"\r\nContent-Disposition: attachment; '
    b"filename*=utf-8''%E4%B8%AD%E6%96%87.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
    b"--OUT\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw==\r\n"
    b'--OUT\r\nContent-Type: text/plain; name="=?utf-8?q?n=C3=B6tes.txt?="\r\n\r\nnotes\r\n'
    b"--OUT\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--OUT--\r\n",
)


def test_multipart_message_layout_headers_and_attachment_indexes() -> None:
    parsed = parse_message(MIXED)
    h = parsed.headers
    assert (h.message_id, h.subject, h.in_reply_to) == ("<m1@example.test>", "files €", "<p@example.test>")
    assert h.references == ["<r@example.test>", "<p@example.test>"]
    assert h.date == "2025-01-06T10:00:00+00:00"
    assert parsed.text.strip() == "plain body"
    assert "<b>body</b>" in parsed.html
    assert [(a.index, a.filename, a.mime_type) for a in parsed.attachments] == [
        (0, "中文.pdf", "application/pdf"),
        (1, "part-3.png", "image/png"),
        (2, "nötes.txt", "text/plain"),
        (3, "message-5.eml", "message/rfc822"),
    ]
    assert parsed.attachment(0) == b"%PDF-"
    assert parsed.attachment(2).strip() == b"notes"
    assert b"inner body" in parsed.attachment(3)


def test_imap_part_numbers_follow_rfc3501() -> None:
    numbers = [leaf.number for leaf, _ in message_leaves(parse_message(MIXED).message)]
    assert numbers == ["1.1", "1.2", "2", "3", "4", "5"]
    single_part = parse_message(single("utf-8", b"x")).message
    assert [leaf.number for leaf, _ in message_leaves(single_part)] == ["1"]


def test_html_only_message_reads_as_text() -> None:
    data = raw(
        "From: a@example.test\nContent-Type: text/html; charset=utf-8\n",
        b"<html><body><h1>Hi</h1><p>line<br>two</p><script>evil()</script></body></html>",
    )
    parsed = parse_message(data)
    assert parsed.text == "" and parsed.best_text() == "Hi\n\nline\ntwo"


def test_malformed_messages_do_not_raise() -> None:
    for data in (
        b"",
        b"\x00\xff\xfe",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary at all",
        b"Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\nContent-Type: ???\r\n\r\nx",
        b"Subject: =?utf-8?q?unterminated\r\nFrom: <<<@>>>\r\nDate: 99 Foo 99999\r\n\r\nx",
    ):
        parsed = parse_message(data)
        assert isinstance(parsed.best_text(), str)


def test_charset_table() -> None:
    assert codec_for(None) == "utf-8" and codec_for("GBK") == "gb18030"
    assert codec_for("ISO-8859-1") == "cp1252" and codec_for("nonsense") == "utf-8"
    assert decode_text(b"\xe4\xb8", "utf-8") == "\ufffd"


def test_classify_body_versus_attachments() -> None:
    def leaf(number: str, mime: str, disposition: str | None = None, filename: str | None = None) -> Leaf:
        return Leaf(number, mime, None, "7bit", disposition, filename, 1)

    layout = classify(
        [
            leaf("1", "text/plain"),
            leaf("2", "text/plain", "attachment"),
            leaf("3", "text/html", filename="x.html"),
            leaf("4", "text/html", "inline"),
        ]
    )
    assert [x.number for x in layout.text] == ["1"]
    assert [x.number for x in layout.html] == ["4"]
    assert [x.number for x in layout.attachments] == ["2", "3"]


def test_rfc2231_parameters() -> None:
    assert param_value([("filename*", "utf-8''%E4%B8%AD.pdf")], "filename") == "中.pdf"
    assert param_value([("FILENAME*0*", "utf-8''%E4%B8"), ("filename*1*", "%AD.pdf")], "filename") == "中.pdf"
    assert param_value([("name", '"a b.txt"')], "name") == "a b.txt"
    assert param_value([("charset", "x")], "name") is None


def test_html_to_text_keeps_structure_and_link_targets() -> None:
    html = (
        "<html><head><title>T</title><style>p{}</style></head><body><h2>News &amp; notes</h2>"
        "<p>First\nparagraph</p><ul><li>one</li><li>two</li></ul>"
        '<p><a href="https://example.test/x">the link</a> <a href="mailto:a@b">mail</a></p>'
        "<pre>  keep   spacing\n  here</pre><table><tr><td>a</td><td>b</td></tr></table></body></html>"
    )
    text = html_to_text(html)
    assert text.startswith("News & notes\n\nFirst paragraph")
    assert "- one\n- two" in text
    assert "the link <https://example.test/x>" in text and "mailto" not in text
    assert "  keep   spacing\n  here" in text
    assert "T" not in text.split("\n")[0] or text.split("\n")[0] == "News & notes"
    assert "p{}" not in text
