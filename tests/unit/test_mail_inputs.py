"""Checks on everything that comes from outside before it reaches IMAP or the disk, and the pure
IMAP helpers (BODYSTRUCTURE leaves, COPYUID)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from carrier.mail import files
from carrier.mail.imap import (
    MailInputError,
    _copyuid,
    check_folder,
    check_search_query,
    check_uid,
    structure_leaves,
    tokenize_search,
)
from carrier.mail.mime import classify


@pytest.mark.parametrize("name", ["INBOX", "Archive/2024", "Entwürfe", "中文 folder", "a" * 1000])
def test_good_folder_names(name: str) -> None:
    assert check_folder(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must be a folder name"),
        ("   ", "must be a folder name"),
        ("IN\r\nBOX", "CR, LF or NUL"),
        ("a\nb", "CR, LF or NUL"),
        ("a\x00", "CR, LF or NUL"),
        ("a" * 1001, "longer than"),
        (None, "folder name"),
    ],
)
def test_bad_folder_names(name: object, fragment: str) -> None:
    with pytest.raises(MailInputError, match=fragment):
        check_folder(name)


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("42", 42), (2**32 - 1, 2**32 - 1)])
def test_good_uids(value: object, expected: int) -> None:
    assert check_uid(value) == expected


@pytest.mark.parametrize(
    "value", [0, -3, 2**32, "1 2", " 7", "7 ", "1:*", "1,2", "", "0x10", 1.0, True, None]
)
def test_bad_uids_are_refused_with_a_clear_message(value: object) -> None:
    with pytest.raises(MailInputError, match="uid must be a positive whole number"):
        check_uid(value)


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("UNSEEN\r\nA001 LOGOUT", "CR, LF or NUL"),
        ("UNSEEN\nX", "CR, LF or NUL"),
        ("SUBJECT {5}", "literal"),
        ("SUBJECT {12+}", "literal"),
        ("TEXT \x00", "CR, LF or NUL"),
        ("SUBJECT \x07", "control characters"),
        ("SUBJECT grüße", "must be ASCII"),
    ],
)
def test_search_queries_with_line_breaks_literals_or_8bit_are_refused(query: str, fragment: str) -> None:
    with pytest.raises(MailInputError, match=fragment):
        check_search_query(query)


def test_plain_search_queries_pass() -> None:
    assert check_search_query('UNSEEN SUBJECT "weekly {report}"') == 'UNSEEN SUBJECT "weekly {report}"'


def test_search_tokenizer() -> None:
    assert tokenize_search('UNSEEN SUBJECT "two words" (OR FROM a TO "b \\"c\\"")') == [
        b"UNSEEN",
        b"SUBJECT",
        "two words",
        [b"OR", b"FROM", b"a", b"TO", 'b "c"'],
    ]
    for bad, fragment in (
        ("(UNSEEN", "unmatched '('"),
        ("UNSEEN)", "unmatched ')'"),
        ('SUBJECT "open', "unterminated"),
        ("()", "empty parentheses"),
    ):
        with pytest.raises(MailInputError, match=re.escape(fragment)):
            tokenize_search(bad)


# BODYSTRUCTURE as imapclient returns it from Dovecot (captured), for the MIXED message shape.
STRUCTURE = (
    [
        (
            [
                (
                    b"text",
                    b"plain",
                    (b"charset", b"utf-8"),
                    None,
                    None,
                    b"7bit",
                    12,
                    1,
                    None,
                    None,
                    None,
                    None,
                ),
                (
                    b"text",
                    b"html",
                    (b"charset", b"utf-8"),
                    None,
                    None,
                    b"7bit",
                    25,
                    1,
                    None,
                    None,
                    None,
                    None,
                ),
            ],
            b"alternative",
            (b"boundary", b"IN"),
            None,
            None,
            None,
        ),
        (
            b"application",
            b"pdf",
            (b"name", b"a.pdf"),
            None,
            None,
            b"base64",
            8,
            None,
            (b"attachment", (b"filename*", b"utf-8''%E4%B8%AD%E6%96%87.pdf")),
            None,
            None,
        ),
        (b"image", b"png", None, None, None, b"base64", 8, None, None, None, None),
        (
            b"text",
            b"plain",
            (b"name", b"=?utf-8?q?n=C3=B6tes.txt?="),
            None,
            None,
            b"7bit",
            5,
            1,
            None,
            None,
            None,
            None,
        ),
        (
            b"message",
            b"rfc822",
            None,
            None,
            None,
            b"7bit",
            30,
            (None,) * 10,
            (
                b"text",
                b"plain",
                (b"charset", b"us-ascii"),
                None,
                None,
                b"7bit",
                10,
                1,
                None,
                None,
                None,
                None,
            ),
            2,
            None,
            (b"inline", None),
            None,
            None,
        ),
    ],
    b"mixed",
    (b"boundary", b"OUT"),
    None,
    None,
    None,
)


def _as_imapclient(structure: tuple[object, ...]) -> object:
    from imapclient.response_types import BodyData

    def convert(part: object) -> object:
        if isinstance(part, tuple) and part and isinstance(part[0], list):
            return BodyData(([convert(p) for p in part[0]], *part[1:]))
        return part

    return convert(structure)


def test_structure_leaves_number_and_classify_like_the_parser() -> None:
    leaves = structure_leaves(_as_imapclient(STRUCTURE))
    assert [leaf.number for leaf in leaves] == ["1.1", "1.2", "2", "3", "4", "5"]
    layout = classify(leaves)
    assert [leaf.number for leaf in layout.text] == ["1.1"] and [leaf.number for leaf in layout.html] == [
        "1.2"
    ]
    assert [(leaf.number, leaf.filename, leaf.mime_type) for leaf in layout.attachments] == [
        ("2", "中文.pdf", "application/pdf"),
        ("3", None, "image/png"),
        ("4", "nötes.txt", "text/plain"),
        ("5", None, "message/rfc822"),
    ]
    assert layout.attachments[0].encoding == "base64" and layout.attachments[0].size == 8
    assert layout.attachments[3].disposition == "inline"


def test_single_part_structure_is_part_one() -> None:
    leaves = structure_leaves(
        (b"TEXT", b"PLAIN", (b"CHARSET", b"GBK"), None, None, b"BASE64", 8, 1, None, None, None, None)
    )
    assert [(x.number, x.mime_type, x.charset, x.encoding) for x in leaves] == [
        ("1", "text/plain", "GBK", "base64")
    ]


def test_copyuid_response_gives_the_new_uid() -> None:
    assert _copyuid([b"[COPYUID 1700000000 12 45] Moved UIDs."], 12) == 45
    assert _copyuid([b"OK done", b"[COPYUID 17 12 45]"], 12) == 45
    assert _copyuid([b"[COPYUID 17 13 45]"], 12) is None
    assert _copyuid([b"Copy completed"], 12) is None
    assert _copyuid([b"1795316593 12 2"], 12) == 2  # imaplib's parsed COPYUID response code


# --- the download directory ---


def test_paths_outside_the_download_dir_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in ("../outside/x", str(outside / "x"), "/etc/passwd", "a/../../outside", "x\x00y"):
        with pytest.raises(MailInputError):
            files.resolve_inside(root, bad, "save_to")
    (root / "link").symlink_to(outside)
    with pytest.raises(MailInputError, match="outside the download directory"):
        files.resolve_inside(root, "link/x", "save_to")
    assert oct(root.stat().st_mode & 0o777) == "0o700"


def test_target_file_in_a_directory_never_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    first = files.target_file(root, "", "report.pdf")
    assert first == Path(os.path.realpath(root)) / "report.pdf"
    files.write_new(first, b"1")
    second = files.target_file(root, ".", "report.pdf")
    assert second.name == "report (1).pdf"
    assert files.target_file(root, "", "../../evil").parent == first.parent  # name sanitised
    with pytest.raises(MailInputError, match="already exists"):
        files.target_file(root, "report.pdf", "x")
    with pytest.raises(MailInputError, match="already exists"):
        files.write_new(first, b"2")
    assert first.read_bytes() == b"1" and oct(first.stat().st_mode & 0o777) == "0o600"


def test_write_new_does_not_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(MailInputError):
        files.write_new(link, b"overwrite")
    assert victim.read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b\\c.txt", "a_b_c.txt"),
        ("..hidden", "hidden"),
        ("", "attachment.bin"),
        ("\x00\x01", "_"),
        ("x" * 300 + ".pdf", "x" * 196 + ".pdf"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert files.safe_filename(name) == expected


def test_read_inside_caps_size(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    root.mkdir()
    (root / "small.txt").write_bytes(b"abc")
    (root / "big.bin").write_bytes(b"x" * 100)
    assert files.read_inside(root, "small.txt", 10) == ("small.txt", b"abc")
    with pytest.raises(MailInputError, match="over the 10-byte cap"):
        files.read_inside(root, "big.bin", 10)
    with pytest.raises(MailInputError, match="not a file"):
        files.read_inside(root, "missing.txt", 10)
