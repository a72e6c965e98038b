"""Encrypted command mail through `carrier serve` (RFC 3156 PGP/MIME, real gpg on both sides).

A mail signed then encrypted to Carrier's key (section 6.1) or signed and encrypted in one OpenPGP
message (section 6.2) is decrypted, verified as before and run; with ``encrypt auto`` (the default)
the reply and the job's result come back encrypted to the user's key. ``settings encrypt on|off``
forces it (a schedule's result mail follows ``on`` too); an encrypted mail without a signature, or
one Carrier cannot decrypt, runs nothing and is answered plainly; when encryption is wanted but the
user's key cannot encrypt any more, the reply is signed only and withholds the content (never the
output in clear)."""

from __future__ import annotations

import email
import subprocess
import tempfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from auth_support import (
    NO_PASSPHRASE,
    GpgUser,
    copy_home,
    expire_encryption_subkey,
    gpg,
    headers_block,
    pgp_mime,
    primary_fingerprint,
    text_entity,
)
from door_support import Serve, db_rows, identities, is_encrypted, opened, serving, text_of, wait_replies
from mail_support import deliver, token

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

ROLES = {"operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "pty": True, "schedules": True}}
PEM = b"-----BEGIN PGP MESSAGE-----"


# --------------------------------------------------------------------------- what a mail client sends


def _encrypt(user: GpgUser, data: bytes, recipient: Path | str, *, sign: bool) -> bytes:
    """``data`` encrypted (and signed in the same message when ``sign``) as the user's gpg does it."""
    to = ["--recipient-file", str(recipient)] if isinstance(recipient, Path) else ["--recipient", recipient]
    signing = ["--sign", "--local-user", user.fingerprint] if sign else []
    return gpg(user.home, *NO_PASSPHRASE, "--trust-model", "always", "--armor", *signing, "--encrypt", *to,
               data=data)


def encrypted_mail(user: GpgUser, subject: str, armored: bytes) -> bytes:
    """An RFC 3156 multipart/encrypted mail from ``user`` carrying ``armored``."""
    head = headers_block(user.address, address("carrier"), subject)
    head.append('Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="enc-b"')
    body = (b"This is an OpenPGP/MIME encrypted message\r\n--enc-b\r\n"
            b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--enc-b\r\n"
            b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
            + armored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n--enc-b--\r\n")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def signed_then_encrypted(user: GpgUser, text: str, subject: str, carrier_key: Path) -> bytes:
    """RFC 3156 section 6.1: a PGP/MIME signed entity, encrypted."""
    signed = pgp_mime(user, text, subject=subject)
    head, body = signed.split(b"\r\n\r\n", 1)
    ctype = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-type:"))
    return encrypted_mail(user, subject, _encrypt(user, ctype + b"\r\n\r\n" + body, carrier_key, sign=False))


def signed_and_encrypted(user: GpgUser, text: str, subject: str, carrier_key: Path) -> bytes:
    """RFC 3156 section 6.2: one OpenPGP message, signed and encrypted (what most clients send)."""
    return encrypted_mail(user, subject, _encrypt(user, text_entity(text), carrier_key, sign=True))


def send(sandbox: Sandbox, user: GpgUser, raw: bytes) -> str:
    deliver(sandbox.layout, raw, sender=user.address, to=[address("carrier")])
    return str(email.message_from_bytes(raw)["Message-ID"])


# --------------------------------------------------------------------------- what the user reads


@pytest.fixture
def served(sandbox: Sandbox) -> Iterator[tuple[Serve, Path, Path]]:
    """`carrier serve` with a private copy of Carrier's GnuPG home (a test may change the keys in it)."""
    users = [{"email": address("ops"), "role": "operator",
              "fingerprint": primary_fingerprint(sandbox.layout.gnupg_home("ops"), address("ops"))}]
    scratch = Path(tempfile.mkdtemp(prefix="cenc-", dir="/var/tmp"))
    home = copy_home(sandbox.layout.gnupg_home("carrier"), scratch)
    carrier_key = scratch / "carrier.asc"
    carrier_key.write_bytes(gpg(home, "--armor", "--export", address("carrier")))
    try:
        with serving(sandbox, roles=ROLES, users=users, gnupg_home=str(home)) as (serve, directory):
            serve.start()
            yield serve, directory, carrier_key
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                       check=False, timeout=30)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


def ask(sandbox: Sandbox, user: GpgUser, raw_of: Any, text: str, count: int = 1) -> list[Message]:
    tag = token("enc")
    send(sandbox, user, raw_of(user, text, f"encrypted {tag}"))
    return wait_replies(sandbox, "ops", tag, count, timeout=180)


def plain(user: GpgUser, text: str, subject: str) -> bytes:
    return pgp_mime(user, text, subject=subject)


def jobs(state: Path) -> list[tuple[Any, ...]]:
    return db_rows(state, "SELECT id, kind, owner FROM jobs")


# --------------------------------------------------------------------------- the tests


def test_encrypted_commands_run_and_are_answered_encrypted(
        sandbox: Sandbox, served: tuple[Serve, Path, Path]) -> None:
    serve, directory, carrier_key = served
    with identities(sandbox) as people:
        ops = people["ops"]

        def sealed(user: GpgUser, text: str, subject: str) -> bytes:
            return signed_then_encrypted(user, text, subject, carrier_key)

        reply, result = ask(sandbox, ops, sealed, "run ping on web1\n", count=2)
        for message in (reply, result):
            assert is_encrypted(message), message.get_content_type()
            assert b"web1" not in message.as_bytes()  # nothing of the command or its output in clear
        answer, done = text_of(opened(ops, reply)), text_of(opened(ops, result))
        assert "> run ping on web1" in answer and "accepted" in answer.lower(), answer
        assert "web1" in done and "succeeded" in done, done
        ((job_id, kind, owner),) = jobs(directory / "state")
        assert (kind, owner) == ("playbook", address("ops")) and job_id in answer

        # Signed and encrypted in one OpenPGP message (section 6.2): the same.
        (hosts,) = ask(sandbox, ops, lambda u, t, s: signed_and_encrypted(u, t, s, carrier_key),
                       "hosts web\n")
        assert is_encrypted(hosts) and "web1" in text_of(opened(ops, hosts))

        # A signed-only mail under `encrypt auto`: a signed-only reply. (Another text: the same bytes
        # signed by the same key in the same second are one signature to the replay check.)
        (clear,) = ask(sandbox, ops, plain, "hosts web1\n")
        assert not is_encrypted(clear) and "web1" in text_of(clear)
    assert not any("run ping" in str(line) for line in serve.lines)  # the command text is not logged


def test_settings_encrypt_on_and_off(sandbox: Sandbox, served: tuple[Serve, Path, Path]) -> None:
    _serve, directory, carrier_key = served
    state = directory / "state"
    with identities(sandbox) as people:
        ops = people["ops"]
        (shown,) = ask(sandbox, ops, plain, "settings\n")
        assert "encrypt auto: a reply to an encrypted mail is encrypted" in text_of(shown), text_of(shown)

        (on,) = ask(sandbox, ops, plain, "settings encrypt on\n")
        assert is_encrypted(on)  # the setting counts from the reply to the mail that set it
        assert "encrypt set to always: every reply to you is encrypted" in text_of(opened(ops, on))
        (hosts,) = ask(sandbox, ops, plain, "hosts web\n")
        assert is_encrypted(hosts) and "web1" in text_of(opened(ops, hosts))

        (off,) = ask(sandbox, ops, plain, "settings encrypt off\n")
        assert not is_encrypted(off) and "encrypt set to never" in text_of(off), text_of(off)
        # `never`: even an encrypted mail is answered signed only.
        (clear,) = ask(sandbox, ops, lambda u, t, s: signed_and_encrypted(u, t, s, carrier_key),
                       "hosts web*\n")
        assert not is_encrypted(clear) and "web1" in text_of(clear)

        (bad,) = ask(sandbox, ops, plain, "settings encrypt sometimes\n")
        assert "`settings encrypt` needs on, off or auto" in text_of(bad), text_of(bad)
        (other,) = ask(sandbox, ops, plain, "settings colour blue\n")
        assert "unknown setting 'colour'" in text_of(other), text_of(other)
    assert db_rows(state, "SELECT identity, encrypt FROM user_settings") == [(address("ops"), "never")]
    rows = db_rows(state, "SELECT actor, door, outcome FROM audit WHERE action = 'settings:encrypt' "
                          "ORDER BY id")
    assert rows == [(address("ops"), "mail", "always"), (address("ops"), "mail", "never")]
    decided = db_rows(state, "SELECT outcome FROM audit WHERE action = 'decide:settings'")
    assert [o for (o,) in decided] == ["allowed"] * 3  # settings, on, off (bad lines are not decided)


def test_a_schedule_result_follows_encrypt_on(sandbox: Sandbox, served: tuple[Serve, Path, Path]) -> None:
    with identities(sandbox) as people:
        ops = people["ops"]
        (on,) = ask(sandbox, ops, plain, "settings encrypt on\n")
        assert is_encrypted(on)
        name = token("s").replace("-", "")[:20]
        line = f'schedule add {name} ping on web1 cron "* * * * * */5" notify always\n'
        (added,) = ask(sandbox, ops, plain, line)
        assert f"schedule {name} added" in text_of(opened(ops, added))
        result = wait_replies(sandbox, "ops", f"Carrier schedule {name}", 1, timeout=180)[0]
        assert is_encrypted(result) and b"web1" not in result.as_bytes()
        assert "web1" in text_of(opened(ops, result))
        (removed,) = ask(sandbox, ops, plain, f"schedule remove {name}\n")
        assert f"schedule {name} removed" in text_of(opened(ops, removed))


def test_encrypted_but_unsigned_is_refused_and_runs_nothing(
        sandbox: Sandbox, served: tuple[Serve, Path, Path]) -> None:
    _serve, directory, carrier_key = served
    state = directory / "state"
    with identities(sandbox) as people:
        ops = people["ops"]

        def unsigned(user: GpgUser, text: str, subject: str) -> bytes:
            return encrypted_mail(user, subject, _encrypt(user, text_entity(text), carrier_key, sign=False))

        (reply,) = ask(sandbox, ops, unsigned, "exec web1 touch /tmp/carrier-enc-unsigned\n")
        text = text_of(reply)
        assert not is_encrypted(reply)
        assert "Refused: This mail was encrypted but not signed, so nothing ran: Carrier runs only " \
               "commands signed with your enrolled key. Sign and encrypt it, and send it again." in text, text
        assert "exec web1" not in text  # what the unsigned mail said is not echoed back
    assert jobs(state) == []
    assert db_rows(state, "SELECT state, error FROM messages") == [("failed", "unsigned")]


def test_undecryptable_mail_gets_a_clear_answer(sandbox: Sandbox, served: tuple[Serve, Path, Path]) -> None:
    serve, directory, _carrier_key = served
    state = directory / "state"
    with identities(sandbox) as people:
        ops = people["ops"]

        def to_wrong_key(user: GpgUser, text: str, subject: str) -> bytes:  # to the user's key, not Carrier's
            sealed = _encrypt(user, text_entity(text), user.fingerprint, sign=True)
            return encrypted_mail(user, subject, sealed)

        def garbage(user: GpgUser, text: str, subject: str) -> bytes:
            return encrypted_mail(user, subject, PEM + b"\n\nbm90IGFuIE9wZW5QR1AgbWVzc2FnZQ==\n"
                                  b"-----END PGP MESSAGE-----\n")

        for raw_of in (to_wrong_key, garbage):
            (reply,) = ask(sandbox, ops, raw_of, "run ping on web1\n")
            text = text_of(reply)
            assert "Refused: Carrier could not decrypt this mail: encrypt it (PGP/MIME) to the key this " \
                   "reply is signed with, or send the command signed only." in text, text
        # Nothing ran; both mails are recorded as failed (still in the mailbox, answered once each).
        assert jobs(state) == []
        assert db_rows(state, "SELECT state, error FROM messages") == [("failed", "undecryptable")] * 2
        # And the door still works.
        (hosts,) = ask(sandbox, ops, plain, "hosts web\n")
        assert "web1" in text_of(hosts)
    assert serve.proc is not None and serve.proc.poll() is None


def test_encrypt_always_with_a_key_that_cannot_encrypt_withholds_the_reply(
        sandbox: Sandbox, served: tuple[Serve, Path, Path]) -> None:
    serve, directory, carrier_key = served
    state = directory / "state"
    with identities(sandbox) as people:
        ops = people["ops"]
        (on,) = ask(sandbox, ops, plain, "settings encrypt on\n")
        assert is_encrypted(on)

        # The user's encryption subkey expires; Carrier learns the new key (restart: a fresh keyring view).
        assert serve.stop() == 0
        expired = expire_encryption_subkey(ops, carrier_key.parent)
        gpg(carrier_key.parent / "carrier", "--import", data=expired)
        serve.start()

        reply, result = ask(sandbox, ops, plain, "run ping on web1\nhosts web\n", count=2)
        for message in (reply, result):
            assert not is_encrypted(message)
            text = text_of(message)
            assert "This reply is NOT encrypted and its content is withheld: your setting is `encrypt " \
                   "always`, but your key has no usable encryption subkey" in text, text
            assert "settings encrypt off" in text
            assert "web1" not in text and "ping" not in text.replace(message["Subject"], "")  # no content
        ((job_id, _kind, _owner),) = jobs(state)  # the signed commands did run
        assert f"command 1: accepted (job {job_id})" in text_of(reply), text_of(reply)
        assert "command 2: done" in text_of(reply)
        assert f"job {job_id}: succeeded" in text_of(result), text_of(result)
        assert any(line.get("msg") == "reply withheld: encryption wanted but the key cannot encrypt"
                   for line in serve.lines)

        # Asking for encryption again is refused up front; `off` brings plain replies back.
        (again,) = ask(sandbox, ops, plain, "settings encrypt on\n")
        assert "your key has no usable encryption subkey" in text_of(again), text_of(again)
        (off,) = ask(sandbox, ops, plain, "settings encrypt off\nhosts web\n")
        assert not is_encrypted(off) and "encrypt set to never" in text_of(off) and "web1" in text_of(off)
