"""Bad input at the email door (issue 7's list): each mail goes through the listener's own path
(``carrier.mail.gateway.handle_mail``) with the real store, gpg signatures from ops@'s sandbox key
and the real job manager; each is recorded (nothing lost), answered or dropped as documented in
docs/email.md, and runs nothing it should not. The listener's survival is shown end to end by the
last test, against a real `carrier serve`."""

from __future__ import annotations

import email
import time

import pytest
from auth_support import GpgUser, headers_block, inline_mail, pgp_mime
from door_support import (
    LocalDoor,
    db_rows,
    identities,
    local_door,
    serving,
    store_keys,
    text_of,
    wait_replies,
)
from mail_support import deliver, imap_as, token

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox


@pytest.fixture(scope="module")
def ops(sandbox: Sandbox) -> GpgUser:
    with identities(sandbox) as people:
        yield people["ops"]


@pytest.fixture
def door(sandbox: Sandbox) -> LocalDoor:
    with local_door(sandbox) as made:
        yield made


def unique(text: str) -> str:
    """``text`` with a signature block (ignored by the grammar) that makes every signature unique:
    two identical texts signed in the same second would otherwise be one signature (a replay)."""
    return f"{text}\n-- \n{token('sig')}\n"


def message_id(raw: bytes) -> str:
    value = email.message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")["Message-ID"]
    assert value
    return str(value)


def signed_entity(ops: GpgUser, entity: bytes, subject: str = "command") -> bytes:
    """A PGP/MIME mail whose signed part is ``entity`` (any MIME; line ends made CRLF, as sent)."""
    entity = entity.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return pgp_mime(ops, "", entity=entity, subject=subject)


def only_reply(door: LocalDoor, raw: bytes) -> str:
    (reply,) = door.replies_to(message_id(raw))
    assert reply["To"] == address("ops")
    return text_of(reply)


def no_jobs(door: LocalDoor) -> None:
    assert door.jobs_rows() == []


# --------------------------------------------------------------------------- mail bombs


def test_deeply_nested_mime_is_recorded_and_runs_nothing(door: LocalDoor, ops: GpgUser) -> None:
    depth = 5000
    head = headers_block(ops.address, address("carrier"), "bomb")
    open_parts = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth)
    )
    close_parts = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(depth)))
    raw = (
        "\r\n".join(head[:-1]).encode()
        + b"\r\nMIME-Version: 1.0\r\n"
        + open_parts.encode()
        + b"Content-Type: text/plain\r\n\r\nexec web1 echo BOMB\r\n"
        + close_parts.encode()
    )
    # Too deep for the MIME parser: recorded as dropped, no answer (it is not a mail a person wrote).
    assert door.handle(raw) == "dropped: unreadable mail: RecursionError"
    key = message_id(raw)
    assert door.state(key) == ("failed", "unreadable mail: RecursionError")
    assert door.replies() == []
    no_jobs(door)
    # The door is fine afterwards: the next mail is answered.
    good = pgp_mime(ops, unique("jobs"), subject="after the bomb")
    assert door.handle(good) == "answered"
    assert "most recent job(s)" in only_reply(door, good)


def test_ten_thousand_parts_signed_run_only_the_signed_text(door: LocalDoor, ops: GpgUser) -> None:
    boundary = "many-parts"
    parts = [f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{unique('jobs')}"]
    parts += [
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="p{i}.bin"\r\n\r\nexec web1 echo PART{i}\r\n'
        for i in range(10_000)
    ]
    entity = (
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        + "\r\n".join(parts)
        + f"\r\n--{boundary}--\r\n"
    ).encode()
    raw = signed_entity(ops, entity, "parts")
    assert door.handle(raw) == "answered"
    text = only_reply(door, raw)
    assert "> jobs" in text and "most recent job(s)" in text
    assert "PART" not in text
    no_jobs(door)
    assert door.state(message_id(raw)) == ("done", None)


def test_unsigned_ten_thousand_parts_get_the_signing_hint(door: LocalDoor, ops: GpgUser) -> None:
    boundary = "many-unsigned"
    head = headers_block(ops.address, address("carrier"), "parts")
    head.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    body = "".join(
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nexec web1 echo PART{i}\r\n" for i in range(10_000)
    )
    raw = ("\r\n".join(head) + "\r\n\r\n" + body + f"--{boundary}--\r\n").encode()
    assert door.handle(raw) == "refused: unsigned"
    assert "signed with your enrolled key" in only_reply(door, raw)
    no_jobs(door)


# --------------------------------------------------------------------------- broken MIME, charsets, HTML


def test_broken_mime_is_answered_and_runs_nothing(door: LocalDoor, ops: GpgUser) -> None:
    head = headers_block(ops.address, address("carrier"), "broken")
    head.append("Content-Type: multipart/mixed")  # no boundary at all
    head.append("Content-Transfer-Encoding: base64")
    raw = (
        "\r\n".join(head) + "\r\n\r\n"
    ).encode() + b"\x00\xff not base64 !!!\r\n--x\r\nexec web1 echo X\r\n"
    assert door.handle(raw) == "refused: unsigned"
    only_reply(door, raw)
    # A signed entity whose inner multipart never ends: the signature is good, the text is read.
    entity = (
        b'Content-Type: multipart/mixed; boundary="open"\r\n\r\n--open\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + unique("jobs").encode().replace(b"\n", b"\r\n")
    )
    raw2 = signed_entity(ops, entity, "open multipart")
    assert door.handle(raw2) == "answered"
    assert "most recent job(s)" in only_reply(door, raw2)
    no_jobs(door)


def test_unknown_charset_is_answered_with_what_to_do(door: LocalDoor, ops: GpgUser) -> None:
    entity = (
        b"Content-Type: text/plain; charset=x-no-such-charset\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + f"exec web1 echo CHARSET-{token()}\r\n".encode()
    )
    raw = signed_entity(ops, entity, "charset")
    assert door.handle(raw) == "refused: malformed"
    text = only_reply(door, raw)
    assert "unknown charset" in text and "plain text (UTF-8), signed" in text
    assert door.state(message_id(raw))[0] == "failed"
    no_jobs(door)


def test_html_only_mail_is_answered_with_a_plain_text_hint(door: LocalDoor, ops: GpgUser) -> None:
    entity = (
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><body><p>exec web1 echo HTML</p>"
        b"<div style='display:none'>run ping on all</div></body></html>\r\n"
    )
    raw = signed_entity(ops, entity, "html")
    assert door.handle(raw) == "answered"
    text = only_reply(door, raw)
    assert "no plain text" in text and "text/plain only" in text
    no_jobs(door)


# --------------------------------------------------------------------------- too many commands


def test_a_thousand_command_lines_run_nothing_and_say_why(door: LocalDoor, ops: GpgUser) -> None:
    raw = pgp_mime(ops, unique("run ping on web1\n" * 1000), subject="thousand")
    assert door.handle(raw) == "answered"
    text = only_reply(door, raw)
    assert "1000 command lines" in text and "at most 20" in text and "nothing ran" in text
    no_jobs(door)
    assert door.state(message_id(raw)) == ("done", None)


def test_max_commands_comes_from_the_config(sandbox: Sandbox, ops: GpgUser) -> None:
    with local_door(sandbox, mail={"max_commands": 2}) as door:
        raw = pgp_mime(ops, unique("jobs\nhosts\nplaybooks"), subject="three")
        door.handle(raw)
        assert "3 command lines" in only_reply(door, raw) and "at most 2" in only_reply(door, raw)


# --------------------------------------------------------------------------- header injection


def test_header_injection_in_a_variable_or_the_subject_goes_nowhere(door: LocalDoor, ops: GpgUser) -> None:
    evil = "evil@example.test"
    # A CR LF inside a variable (quoted-printable =0D=0A in the signed part) splits the line: the
    # rest is just a malformed command line, echoed in the body, never a header.
    line = f"run disk_usage on web1 path=/\r\nBcc: {evil}\r\nX-Injected: yes"
    raw = pgp_mime(ops, unique(line), subject=f"=?utf-8?q?deploy=0D=0ABcc:_{evil}?=")
    assert door.handle(raw) == "answered"
    (reply,) = door.replies_to(message_id(raw))
    rows = door.store.outbox_due(now=float("inf"), limit=1000)
    (row,) = [r for r in rows if email.message_from_bytes(r.raw)["In-Reply-To"] == message_id(raw)]
    assert list(row.recipients) == [address("ops")]
    for name in ("Bcc", "Cc", "X-Injected"):
        assert reply[name] is None, name
    head = row.raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert "\nBcc:" not in head and "\nX-Injected:" not in head
    assert "\r" not in str(reply["Subject"]) and "\n" not in str(reply["Subject"])
    text = text_of(reply)
    # The rest is quoted in the body as a line not understood; a mail is one request, so the
    # first half did not run either.
    assert f"> Bcc: {evil}" in text and "not run: this mail is one request" in text
    assert "accepted, job j-" not in text
    assert not [r for r in door.jobs_rows() if evil in str(r[3])]
    # A header-like value fails the variable's declared pattern: nothing runs, the answer says why.
    raw2 = pgp_mime(ops, unique(f"run service_status on web1 'service=x Bcc: {evil}'"), subject="quoted")
    assert door.handle(raw2) == "answered"
    (reply2,) = door.replies_to(message_id(raw2))
    assert reply2["Bcc"] is None and reply2["To"] == address("ops")
    assert "service" in text_of(reply2) and "accepted" not in text_of(reply2)
    assert door.jobs_rows() == []  # nothing ran: neither mail started a job


# --------------------------------------------------------------------------- signed and unsigned text


def test_only_signed_text_counts_inline(door: LocalDoor, ops: GpgUser) -> None:
    tag = token("unsigned")
    signed = ops.clearsign(unique("jobs"))
    body = f"exec web1 echo {tag}-before\n\n".encode() + signed + f"\nexec web1 echo {tag}-after\n".encode()
    raw = inline_mail(ops, "", body=body, subject="partly signed")
    assert door.handle(raw) == "answered"
    text = only_reply(door, raw)
    assert "> jobs" in text and tag not in text
    no_jobs(door)


def test_only_signed_text_counts_pgp_mime(door: LocalDoor, ops: GpgUser) -> None:
    tag = token("unsigned")
    raw = pgp_mime(ops, unique("jobs"), subject="preamble")
    # Text in the MIME preamble and epilogue is outside the signed part.
    raw = (
        raw.replace(b"This is an OpenPGP/MIME signed message", f"exec web1 echo {tag}-preamble".encode())
        + f"exec web1 echo {tag}-epilogue\r\n".encode()
    )
    assert door.handle(raw) == "answered"
    text = only_reply(door, raw)
    assert "> jobs" in text and tag not in text
    no_jobs(door)


def test_signed_part_wrapped_with_an_unsigned_part_runs_nothing(door: LocalDoor, ops: GpgUser) -> None:
    tag = token("unsigned")
    inner = pgp_mime(ops, unique("jobs"), subject="inner")
    inner_head, inner_body = inner.split(b"\r\n\r\n", 1)
    ctype = next(line for line in inner_head.split(b"\r\n") if line.startswith(b"Content-Type:"))
    head = headers_block(ops.address, address("carrier"), "wrapped")
    head.append('Content-Type: multipart/mixed; boundary="outer"')
    raw = (
        ("\r\n".join(head) + "\r\n\r\n--outer\r\n").encode()
        + f"Content-Type: text/plain\r\n\r\nexec web1 echo {tag}\r\n--outer\r\n".encode()
        + ctype
        + b"\r\n\r\n"
        + inner_body
        + b"\r\n--outer--\r\n"
    )
    assert door.handle(raw) == "refused: unsigned"
    text = only_reply(door, raw)
    assert tag not in text and "signed with your enrolled key" in text
    no_jobs(door)


# --------------------------------------------------------------------------- the listener survives


def append_to_carrier(sandbox: Sandbox, raw: bytes) -> None:
    """Put ``raw`` straight into carrier@'s INBOX (the MX would refuse a 50 MB mail)."""
    with imap_as(sandbox.layout, "carrier") as client:
        client.append("INBOX", raw)


def test_listener_survives_bad_mail_and_answers_the_next_good_one(sandbox: Sandbox, ops: GpgUser) -> None:
    tag = token("survive")
    bad: list[bytes] = []
    head = headers_block(ops.address, address("carrier"), f"{tag} big")
    head.append("Content-Type: text/plain; charset=utf-8")
    line = b"run ping on web1 " + b"x" * 1000 + b"\r\n"
    big = ("\r\n".join(head) + "\r\n\r\n").encode() + line * (50 * 1024)  # ~50 MB
    bad.append(big)
    depth = 3000
    head = headers_block(ops.address, address("carrier"), f"{tag} bomb")
    bad.append(
        ("\r\n".join(head) + "\r\n").encode()
        + "".join(
            f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth)
        ).encode()
        + b"Content-Type: text/plain\r\n\r\njobs\r\n"
    )
    head = headers_block(ops.address, address("carrier"), f"{tag} broken")
    head.append("Content-Type: multipart/mixed")
    bad.append(("\r\n".join(head) + "\r\n\r\n").encode() + b"\x00\xff--\r\n--\r\n")
    bad.append(
        signed_entity(
            ops,
            b"Content-Type: text/plain; charset=x-nope\r\n\r\n" + unique("jobs").encode(),
            f"{tag} charset",
        )
    )
    bad.append(pgp_mime(ops, unique("jobs\n" * 1000), subject=f"{tag} thousand"))
    with serving(sandbox) as (serve, directory):
        serve.start()
        for raw in bad:
            append_to_carrier(sandbox, raw)
        good = pgp_mime(ops, unique("jobs"), subject=f"{tag} good")
        good_id = message_id(good)
        deliver(sandbox.layout, good, sender=ops.address, to=[address("carrier")])
        replies = wait_replies(sandbox, "ops", f"{tag} good", 1)
        assert replies[0]["In-Reply-To"] == good_id
        assert "most recent job(s)" in text_of(replies[0])
        state = directory / "state"
        # Every bad mail is recorded (nothing lost); the 50 MB one was never fetched.
        deadline = time.monotonic() + 60
        rows: dict[str, tuple[str, str | None]] = {}
        keys = store_keys(sandbox)  # Message-ID -> the store's UIDVALIDITY/UID key
        while time.monotonic() < deadline:
            by_key = {
                str(k): (str(s), e)
                for k, s, e in db_rows(state, "SELECT message_id, state, error FROM messages")
            }
            rows = {mid: by_key[key] for mid, key in keys.items() if key in by_key}
            if all(message_id(raw) in rows for raw in bad):
                break
            time.sleep(0.2)
        for raw in bad:
            assert message_id(raw) in rows, raw[:300]
        assert rows[message_id(big)][0] == "failed" and "too large" in str(rows[message_id(big)][1])
        assert rows[message_id(bad[4])] == ("done", None)
        assert rows[good_id] == ("done", None)
        assert serve.proc is not None and serve.proc.poll() is None
        assert not any(line.get("msg") == "mail listener error" for line in serve.lines)
        # The big one is flagged done in the mailbox too, so it is never looked at again.
        with imap_as(sandbox.layout, "carrier") as client:
            client.select_folder("INBOX", readonly=True)
            uids = client.search(["SUBJECT", f"{tag} big"])
            flags = client.get_flags(uids)
        assert uids and all(b"CarrierDone" in f for f in flags.values())
        # The thousand-line mail got its answer in the thread; nothing ran.
        (thousand,) = wait_replies(sandbox, "ops", f"{tag} thousand", 1)
        assert "nothing ran" in text_of(thousand)
        assert db_rows(state, "SELECT id FROM jobs") == []
        assert serve.stop() == 0
