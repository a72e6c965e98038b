"""Crafted mail against command authentication, with real gpg keys (the sandbox's and throw-away ones).

Every case goes through ``MailAuthenticator.authenticate`` (From -> enrolled fingerprint ->
signature bound to it -> freshness -> replay), the path every command mail takes, and checks the
reason code of each refusal. Also: Carrier's own signed and encrypted replies, checked with the
users' gpg, and concurrent verifications.
"""

from __future__ import annotations

import base64
import os
import smtplib
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import make_msgid

import pytest
from auth_support import (
    GpgUser,
    KeyFactory,
    World,
    gpg,
    headers_block,
    inline_mail,
    make_world,
    pgp_mime,
    text_entity,
)
from imapclient import IMAPClient

from carrier.auth import pgp
from carrier.auth.errors import AuthError, VerificationError
from carrier.auth.mailauth import Authenticated
from carrier.auth.policy import Identity
from carrier.config import User
from carrier.jobs.system import JobSystem
from carrier.ops import Ops, OpsError
from carrier.sandbox.layout import LOOPBACK
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


@dataclass
class People:
    ops: GpgUser
    admin: GpgUser
    attacker: GpgUser  # a key claiming ops@example.test
    mallory: GpgUser  # another address, key imported into Carrier's keyring
    sub: GpgUser  # signs with a subkey
    old: GpgUser  # expired
    gone: GpgUser  # revoked after signing
    vet: GpgUser  # made an hour ago: can make signatures dated in the past
    gone_mail: bytes  # signed by ``gone`` before its revocation


@pytest.fixture(scope="module")
def people(sandbox: Sandbox) -> Iterator[People]:
    kf = KeyFactory()
    layout = sandbox.layout
    try:
        ops = kf.adopt(layout.gnupg_home("ops"), "ops@example.test", "ops")
        admin = kf.adopt(layout.gnupg_home("admin"), "admin@example.test", "admin")
        gone = kf.make("gone@example.test", name="Gone")
        gone_mail = inline_mail(gone, "exec web uptime")
        kf.revoke(gone)
        yield People(
            ops=ops,
            admin=admin,
            attacker=kf.make("ops@example.test", name="Ops"),
            mallory=kf.make("mallory@example.test", name="Mallory"),
            sub=kf.make("sub@example.test", name="Sub", signing_subkey=True),
            old=kf.make("old@example.test", name="Old", expired=True),
            gone=gone,
            gone_mail=gone_mail,
            vet=kf.make("vet@example.test", name="Vet", born=3600),
        )
    finally:
        kf.close()


@pytest.fixture(scope="module")
def world(sandbox: Sandbox, people: People) -> Iterator[World]:
    users = [User(email=p.address, fingerprint=p.fingerprint, role="operator")
             for p in (people.sub, people.old, people.gone, people.vet)]
    w = make_world(sandbox, users=users)
    # These keys were enrolled while valid; the expired and revoked states arrive later.
    for p in (people.sub, people.old, people.gone, people.vet, people.mallory, people.attacker):
        w.trust.keyring.gpg.import_keys(p.public_key())
    yield w
    w.close()


# A signature by one key over the same text in the same second is the same signature (ed25519 is
# deterministic), i.e. a replay: every mail that is to pass carries a text of its own.
def authenticate(world: World, raw: bytes, key: str | None = None) -> Authenticated:
    return world.trust.mailauth.authenticate(raw, message_key=key or make_msgid(domain="test"))


def refused(world: World, raw: bytes, reason: str, key: str | None = None) -> VerificationError:
    with pytest.raises(VerificationError) as err:
        authenticate(world, raw, key)
    assert err.value.reason == reason, str(err.value)
    return err.value


# --------------------------------------------------------------------------- good mail


def test_pgp_mime_from_an_enrolled_key(world: World, people: People) -> None:
    before = time.time()
    ok = authenticate(world, pgp_mime(people.ops, "run ping on web\nstatus j-aaaaaaaaaaaa\n"))
    assert ok.identity.name == "ops@example.test" and ok.identity.role == "operator"
    assert ok.signature.fingerprint == people.ops.fingerprint and ok.signature.form == "pgp-mime"
    assert ok.signature.text == "run ping on web\nstatus j-aaaaaaaaaaaa\n"
    assert before - 2 <= ok.signature.signed_at <= time.time() + 1


def test_inline_clearsigned_from_an_enrolled_key(world: World, people: People) -> None:
    ok = authenticate(world, inline_mail(people.ops, "exec web uptime\n- a dashed line\n"))
    assert ok.signature.form == "inline"
    assert ok.signature.text == "exec web uptime\n- a dashed line"


def test_pgp_mime_with_bare_lf_line_ends_as_stored_on_disk(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "jobs\n").replace(b"\r\n", b"\n")
    assert authenticate(world, raw).signature.text == "jobs\n"


def test_pgp_mime_through_the_sandbox_mta_and_imap(world: World, people: People, sandbox: Sandbox) -> None:
    layout = sandbox.layout
    raw = pgp_mime(people.ops, "hosts web\n", subject="round trip")
    message_id = next(line for line in raw.decode().split("\r\n") if line.startswith("Message-ID:"))
    with smtplib.SMTP(LOOPBACK, layout.ports.smtp, timeout=10) as smtp:
        smtp.sendmail("ops@example.test", ["carrier@example.test"], raw)
    password = layout.password_file("carrier").read_text().strip()
    fetched = b""
    with IMAPClient(LOOPBACK, port=layout.ports.imap, ssl=False, timeout=10) as imap:
        imap.login("carrier@example.test", password)
        imap.select_folder("INBOX", readonly=True)
        for _ in range(100):  # delivery is asynchronous: wait for it (not a timing assertion)
            uids = imap.search(["HEADER", "Message-ID", message_id.split(":", 1)[1].strip()])
            if uids:
                fetched = imap.fetch(uids, ["BODY.PEEK[]"])[uids[0]][b"BODY[]"]
                break
            time.sleep(0.1)
    assert fetched, "the mail did not arrive"
    assert fetched != raw  # the MTA added headers (Received, Return-Path...)
    assert authenticate(world, fetched).signature.text == "hosts web\n"


def test_signing_subkey_maps_to_the_enrolled_primary(world: World, people: People) -> None:
    ok = authenticate(world, inline_mail(people.sub, "jobs"))
    assert ok.signature.fingerprint == people.sub.fingerprint
    assert ok.signature.signing_key != people.sub.fingerprint
    assert ok.identity.fingerprint == people.sub.fingerprint


# --------------------------------------------------------------------------- who signed


def test_unsigned_mail(world: World, people: People) -> None:
    head = headers_block("ops@example.test", "carrier@example.test", "cmd")
    raw = ("\r\n".join([*head, "Content-Type: text/plain"]) + "\r\n\r\nexec web reboot\r\n").encode()
    refused(world, raw, "unsigned")


def test_unknown_sender_is_not_enrolled(world: World, people: People) -> None:
    err = refused(world, inline_mail(people.mallory, "exec web id"), "not_enrolled")
    assert "send `enroll` first" in str(err)


def test_signed_by_a_key_carrier_does_not_know(world: World, sandbox: Sandbox) -> None:
    kf = KeyFactory()
    try:
        stranger = kf.make("stranger@example.test")
        refused(world, inline_mail(stranger, "exec web id", sender="ops@example.test"), "unknown_key")
    finally:
        kf.close()


def test_signed_by_another_known_key(world: World, people: People) -> None:
    err = refused(world, pgp_mime(people.mallory, "exec web id", sender="ops@example.test"), "wrong_key")
    assert people.mallory.fingerprint in str(err) and people.ops.fingerprint in str(err)


def test_forged_from_with_a_valid_signature_of_someone_else(world: World, people: People) -> None:
    # ops signs, the From header claims the admin: the admin's key is expected, so it fails.
    refused(world, pgp_mime(people.ops, "approve r-aaaaaaaaaaaa", sender="admin@example.test"), "wrong_key")


def test_attacker_key_with_the_victims_address(world: World, people: People) -> None:
    refused(world, inline_mail(people.attacker, "exec web id"), "wrong_key")


def test_expired_key(world: World, people: People) -> None:
    raw = inline_mail(people.old, "jobs", at=time.time() - 1.5 * 86400)
    refused(world, raw, "expired_key")


def test_revoked_key(world: World, people: People) -> None:
    world.trust.keyring.gpg.import_keys(people.gone.public_key())  # the revocation arrives
    refused(world, people.gone_mail, "revoked_key")


# --------------------------------------------------------------------------- what was signed


def test_pgp_mime_over_a_different_body(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "", entity=text_entity("exec web rm -rf /tmp/x\n"),
                   signed_entity=text_entity("status j-aaaaaaaaaaaa\n"))
    refused(world, raw, "bad_signature")


def test_pgp_mime_body_changed_by_one_character(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "exec web uptime\n")
    refused(world, raw.replace(b"exec web uptime", b"exec web uptimE"), "bad_signature")


def test_inline_text_outside_the_armor_does_not_count(world: World, people: People) -> None:
    body = b"exec db1 reboot\n" + people.ops.clearsign("status j-aaaaaaaaaaaa") + b"\nexec web rm -rf /\n"
    ok = authenticate(world, inline_mail(None, "", sender="ops@example.test", body=body))
    assert ok.signature.text == "status j-aaaaaaaaaaaa"


def test_inline_two_signed_blocks_are_refused(world: World, people: People) -> None:
    body = people.ops.clearsign("status j-aaaaaaaaaaaa") + people.ops.clearsign("exec web reboot")
    refused(world, inline_mail(None, "", sender="ops@example.test", body=body), "multiple_signatures")


def test_inline_signed_text_changed(world: World, people: People) -> None:
    body = people.ops.clearsign("exec web uptime").replace(b"exec web uptime", b"exec db1 uptime")
    refused(world, inline_mail(None, "", sender="ops@example.test", body=body), "bad_signature")


def test_html_only_mail_is_unsigned(world: World) -> None:
    head = headers_block("ops@example.test", "carrier@example.test", "cmd")
    raw = ("\r\n".join([*head, "Content-Type: text/html"]) + "\r\n\r\n<p>exec web id</p>\r\n").encode()
    refused(world, raw, "unsigned")


def test_multipart_encrypted_without_its_payload_is_malformed(world: World) -> None:
    head = headers_block("ops@example.test", "carrier@example.test", "cmd")
    head.append('Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"')
    raw = ("\r\n".join(head) + "\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n"
           "Version: 1\r\n--b--\r\n").encode()
    refused(world, raw, "malformed")


def test_multipart_signed_with_another_protocol(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "jobs\n").replace(b'protocol="application/pgp-signature"',
                                                 b'protocol="application/pkcs7-signature"')
    refused(world, raw, "unsigned")


def test_multipart_signed_with_three_parts(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "jobs\n")
    extra = b"--sig-boundary-4711\r\nContent-Type: text/plain\r\n\r\nexec web reboot\r\n--sig-boundary-4711--"
    raw = raw.replace(b"--sig-boundary-4711--", extra)
    refused(world, raw, "malformed")


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def test_two_signatures_in_one_signature_part(world: World, people: People) -> None:
    entity = text_entity("jobs\n")
    signers = (people.ops, people.admin)
    binary = b"".join(gpg(u.home, "--dearmor", data=u.detach_sign(entity)) for u in signers)
    b64 = base64.b64encode(binary).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    crc = base64.b64encode(_crc24(binary).to_bytes(3, "big")).decode()
    armor = "\n".join(["-----BEGIN PGP SIGNATURE-----", "", *lines, "=" + crc,
                       "-----END PGP SIGNATURE-----", ""])
    refused(world, pgp_mime(people.ops, "", entity=entity, signature=armor.encode()), "multiple_signatures")


def test_pgp_mime_wrapped_with_an_unsigned_part_is_unsigned(world: World, people: People) -> None:
    signed = pgp_mime(people.ops, "jobs\n")
    head, _, body = signed.partition(b"\r\n\r\n")
    ctype = next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Type"))
    outer = [line for line in head.split(b"\r\n") if not line.startswith(b"Content-Type")]
    raw = b"\r\n".join([*outer, b'Content-Type: multipart/mixed; boundary="outer"']) + b"\r\n\r\n" + (
        b"--outer\r\n" + ctype + b"\r\n\r\n" + body + b"\r\n--outer\r\n"
        b"Content-Type: text/plain\r\n\r\nexec web rm -rf /\r\n--outer--\r\n")
    refused(world, raw, "unsigned")


def test_unsigned_second_part_next_to_an_inline_signed_one(world: World, people: People) -> None:
    head = headers_block("ops@example.test", "carrier@example.test", "cmd")
    head.append('Content-Type: multipart/mixed; boundary="m"')
    signed = people.ops.clearsign("status j-bbbbbbbbbbbb").replace(b"\n", b"\r\n")
    raw = "\r\n".join(head).encode() + b"\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\n" + signed + (
        b"\r\n--m\r\nContent-Type: text/plain\r\n\r\nexec web reboot\r\n--m--\r\n")
    ok = authenticate(world, raw)
    assert ok.signature.text == "status j-bbbbbbbbbbbb"


def test_two_from_addresses(world: World, people: People) -> None:
    raw = inline_mail(people.ops, "jobs").replace(b"From: ops@example.test",
                                                   b"From: ops@example.test, admin@example.test")
    refused(world, raw, "malformed")


def test_key_embedded_in_a_signature_is_not_imported(world: World) -> None:
    kf = KeyFactory()
    try:
        carol = kf.make("carol@example.test")
        body = gpg(carol.home, "--pinentry-mode", "loopback", "--passphrase", "", "--include-key-block",
                   "--local-user", carol.fingerprint, "--clearsign", data=b"jobs")
        with pytest.raises(VerificationError) as err:
            pgp.verify_mail(world.trust.keyring, inline_mail(None, "", sender=carol.address, body=body),
                            carol.fingerprint)
        assert err.value.reason == "unknown_key"
        assert world.trust.keyring.key(carol.fingerprint) is None
    finally:
        kf.close()


# --------------------------------------------------------------------------- when, and how often


def test_replayed_mail_runs_nothing(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "exec web uptime\n")
    authenticate(world, raw, "carrier:<first@x>")
    refused(world, raw, "replay", "carrier:<second@x>")


def test_replay_rewrapped_in_new_headers(world: World, people: People) -> None:
    raw = pgp_mime(people.ops, "exec web uptime -p\n", subject="first")
    authenticate(world, raw)
    head, _, body = raw.partition(b"\r\n\r\n")
    new_head = b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.startswith((b"Message-ID", b"Subject"))
    ) + b"\r\nSubject: innocent\r\nMessage-ID: <new@example.test>"
    refused(world, new_head + b"\r\n\r\n" + body, "replay")


def test_replay_with_changed_whitespace_and_armor(world: World, people: People) -> None:
    signed = people.ops.clearsign("exec web uptime -s")
    authenticate(world, inline_mail(None, "", sender="ops@example.test", body=signed))
    respaced = signed.replace(b"exec web uptime -s", b"exec web uptime -s   ").replace(
        b"-----BEGIN PGP SIGNATURE-----\n", b"-----BEGIN PGP SIGNATURE-----\nComment: re-armored\n")
    assert respaced != signed
    refused(world, inline_mail(None, "", sender="ops@example.test", body=respaced), "replay")


def test_the_same_mail_may_be_checked_again_after_a_crash(world: World, people: People) -> None:
    raw = inline_mail(people.ops, "status j-cccccccccccc")
    first = authenticate(world, raw, "carrier:<resume@x>")
    again = authenticate(world, raw, "carrier:<resume@x>")
    assert first.signature.digest == again.signature.digest


def test_stale_signature(world: World, people: People) -> None:
    err = refused(world, inline_mail(people.vet, "jobs", at=time.time() - 20 * 60), "stale")
    assert "sign the command again" in str(err)


def test_signature_from_the_future(world: World, people: People) -> None:
    refused(world, inline_mail(people.ops, "jobs", at=time.time() + 10 * 60), "future")


def test_small_clock_skew_is_allowed(world: World, people: People) -> None:
    assert authenticate(world, inline_mail(people.ops, "jobs", at=time.time() + 120)).signature.text == "jobs"


def test_freshness_is_measured_from_when_the_mail_was_received(world: World, people: People) -> None:
    signed_at = time.time() - 20 * 60
    raw = inline_mail(people.vet, "jobs", at=signed_at)
    ok = world.trust.mailauth.authenticate(raw, message_key="carrier:<late@x>", received_at=signed_at + 60)
    assert ok.signature.text == "jobs"


# --------------------------------------------------------------------------- Carrier's own mail


def carrier_fpr(world: World) -> str:
    fpr = world.trust.keyring.secret_fingerprint("carrier@example.test")
    assert fpr is not None
    return fpr


def split_signed(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    boundary = head.split(b'boundary="')[1].split(b'"')[0].decode()
    entity, sig_part = pgp.split_multipart(body, boundary)
    return entity, sig_part.split(b"\r\n\r\n", 1)[1]


def test_carrier_signs_replies_as_pgp_mime(world: World, people: People) -> None:
    fpr = carrier_fpr(world)
    headers = [("From", "Carrier <carrier@example.test>"), ("To", "ops@example.test"),
               ("Subject", "Re: run ping"), ("Message-ID", "<reply1@example.test>")]
    raw = pgp.signed_message(world.trust.keyring, pgp.text_part("job j-aaaaaaaaaaaa finished: rc 0 \n€\n"),
                             headers, fpr)
    assert b'micalg="pgp-sha' in raw and b'protocol="application/pgp-signature"' in raw and raw.isascii()
    entity, signature = split_signed(raw)
    status = people.ops.verify_detached(entity, signature)  # the user's own gpg
    assert f"VALIDSIG {fpr}" in status and "GOODSIG" in status
    mine = pgp.verify_mail(world.trust.keyring, raw, fpr)
    assert mine.text == "job j-aaaaaaaaaaaa finished: rc 0 \n€\n"


def test_carrier_encrypts_to_a_users_key(world: World, people: People) -> None:
    world.trust.finder.ensure("ops@example.test", people.ops.fingerprint)
    headers = [("From", "carrier@example.test"), ("To", "ops@example.test"), ("Subject", "your token")]
    raw = pgp.encrypted_message(world.trust.keyring, pgp.text_part("token: s3cr3t-value\n"), headers,
                                people.ops.fingerprint, signer=carrier_fpr(world))
    assert b"s3cr3t" not in raw and b"multipart/encrypted" in raw
    armored = raw[raw.index(b"-----BEGIN PGP MESSAGE-----"):raw.index(b"-----END PGP MESSAGE-----") + 25]
    plain = people.ops.decrypt(armored)
    assert b"token: s3cr3t-value" in plain.replace(b"=\r\n", b"")


def test_encryption_to_a_key_that_cannot_encrypt_is_refused(world: World) -> None:
    kf = KeyFactory()
    try:
        noenc = kf.make("noenc@example.test", encryption=False)
        world.trust.keyring.gpg.import_keys(noenc.public_key())
        with pytest.raises(AuthError) as err:
            pgp.encrypted_message(world.trust.keyring, pgp.text_part("x"), [("To", noenc.address)],
                                  noenc.fingerprint)
        assert err.value.reason == "unusable"
    finally:
        kf.close()


# --------------------------------------------------------------------------- concurrency and temp files


def test_concurrent_verifications_do_not_interfere(world: World, people: People) -> None:
    mails = [(people.ops if i % 2 else people.sub, f"status j-{'abcdefghijk'[i % 11]}aaaaaaaaaaa {i}\n")
             for i in range(16)]
    raws = [(u, text, pgp_mime(u, text) if i % 3 else inline_mail(u, text.strip()))
            for i, (u, text) in enumerate(mails)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        user, _, raw = raws[i]
        try:
            sig = pgp.verify_mail(world.trust.keyring, raw, user.fingerprint)
            results[i] = sig.text
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(raws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (_, text, _) in enumerate(raws):
        assert results[i] == (text if i % 3 else text.strip())
    tmp = world.trust.keyring.tmp_dir
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o700 and os.listdir(tmp) == []
    assert tmp.is_relative_to(world.config.state_dir)


# --------------------------------------------------------------------------- the mail command `token`


def _ops(world: World) -> Ops:
    """The operations layer over this world's trust layer (these tests start no job)."""

    def no_jobs() -> JobSystem:
        raise AssertionError("a token operation must not need the job system")

    return Ops(world.config, world.store, world.trust.policy, world.trust.audit, no_jobs, trust=world.trust)


def test_token_by_mail_is_issued_only_to_a_key_that_can_decrypt(world: World, people: People) -> None:
    ok = authenticate(world, pgp_mime(people.ops, "token 3600\n"))
    issued = _ops(world).token_for_mail(ok.identity, ttl=3600)
    raw = pgp.encrypted_message(world.trust.keyring, pgp.text_part(f"Your MCP token: {issued.token}\n"),
                                [("To", "ops@example.test")], people.ops.fingerprint,
                                signer=carrier_fpr(world))
    assert issued.token.encode() not in raw
    armored = raw[raw.index(b"-----BEGIN PGP MESSAGE-----"):]
    plain = people.ops.decrypt(armored).replace(b"=\r\n", b"")
    assert issued.token.encode() in plain
    assert world.trust.tokens.identity(issued.token).name == "ops@example.test"
    assert world.store.list_audit(action="token:issue", limit=1)[0].target == issued.record.id


def test_token_by_mail_refused_without_an_encryption_key(world: World) -> None:
    kf = KeyFactory()
    try:
        signer = kf.make("signonly@example.test", encryption=False)
        world.trust.keyring.gpg.import_keys(signer.public_key())
        who = Identity("signonly@example.test", "operator", "mail", fingerprint=signer.fingerprint)
        before = len(world.trust.tokens.list_tokens("signonly@example.test"))
        with pytest.raises(OpsError) as err:
            _ops(world).token_for_mail(who)
        assert "only ever sent encrypted" in str(err.value)
        assert len(world.trust.tokens.list_tokens("signonly@example.test")) == before
    finally:
        kf.close()
