"""Enrollment end to end through the state machine, with the sandbox's real keys, keyserver and
signed mail: request -> challenge -> signed confirm -> admin's signed decision -> enrolled.
Plus every way a step can be repeated, stale, forged or quoted."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import make_msgid

import pytest
from auth_support import GpgUser, KeyFactory, World, inline_mail, make_world, pgp_mime

from carrier.auth import pgp
from carrier.auth.enrollment import Outcome, nonce_hash
from carrier.auth.errors import VerificationError
from carrier.sandbox.manager import Sandbox
from carrier.store import DB_NAME

pytestmark = pytest.mark.sandbox


class Clock:
    """Real time plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Cast:
    newbie: GpgUser
    ops: GpgUser
    admin: GpgUser
    stranger: GpgUser


@pytest.fixture(scope="module")
def cast(sandbox: Sandbox) -> Iterator[Cast]:
    kf = KeyFactory()
    home = sandbox.layout.gnupg_home
    try:
        yield Cast(
            newbie=kf.adopt(home("newbie"), "newbie@example.test"),
            ops=kf.adopt(home("ops"), "ops@example.test"),
            admin=kf.adopt(home("admin"), "admin@example.test"),
            stranger=kf.make("stranger@example.test"),
        )
    finally:
        kf.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world(sandbox: Sandbox, clock: Clock) -> Iterator[World]:
    w = make_world(sandbox, clock=clock)
    yield w
    w.close()


def key() -> str:
    return make_msgid(domain="test")


def nonce_of(outcome: Outcome) -> str:
    match = re.search(r"^confirm ([0-9a-f]{32})$", outcome.reply, re.M)
    assert match, outcome.reply
    return match.group(1)


def challenge(world: World) -> tuple[Outcome, str]:
    out = world.trust.enrollment.request("newbie@example.test")
    assert out.status == "challenged", out.reply
    return out, nonce_of(out)


def confirmed(world: World, cast: Cast) -> str:
    out, nonce = challenge(world)
    done = world.trust.enrollment.respond(pgp_mime(cast.newbie, f"confirm {nonce}\n"), message_key=key())
    assert done.status == "verified", done.reply
    assert out.request is not None
    return out.request.id


# --------------------------------------------------------------------------- the whole flow


def test_enrollment_end_to_end(world: World, cast: Cast, sandbox: Sandbox) -> None:
    enrollment = world.trust.enrollment
    out, nonce = challenge(world)
    assert out.request is not None and out.request.fingerprint == sandbox.gpg().fingerprint("newbie")
    assert "found: keyserver" in out.reply and out.encrypt_to == out.request.fingerprint
    rid = out.request.id

    # The challenge goes out encrypted to the discovered key: only its owner reads the nonce.
    carrier = world.trust.keyring.secret_fingerprint("carrier@example.test")
    assert carrier is not None
    sealed = pgp.encrypted_message(world.trust.keyring, pgp.text_part(out.reply),
                                   [("To", "newbie@example.test")], out.encrypt_to or "", signer=carrier)
    armored = sealed[sealed.index(b"-----BEGIN PGP MESSAGE-----"):]
    assert nonce.encode() not in sealed and nonce.encode() in cast.newbie.decrypt(armored)

    reply = pgp_mime(cast.newbie, f"Re: your challenge\n\nconfirm {nonce}\n")
    done = enrollment.respond(reply, message_key=key())
    assert done.status == "verified"
    assert sorted(n.to for n in done.notices) == ["admin@example.test"]
    assert f"approve {rid} as <role>" in done.notices[0].text

    decision = pgp_mime(cast.admin, f"approve {rid} as operator\n\n> Enrollment request {rid}\n")
    approved = enrollment.admin_mail(decision, message_key=key())
    assert approved.status == "approved" and [n.to for n in approved.notices] == ["newbie@example.test"]
    assert approved.request is not None and approved.request.decided_by == cast.admin.fingerprint

    ok = world.trust.mailauth.authenticate(pgp_mime(cast.newbie, "jobs\n"), message_key=key())
    assert (ok.identity.name, ok.identity.role) == ("newbie@example.test", "operator")
    assert world.trust.audit.verify().ok
    actions = [r.action for r in reversed(world.store.list_audit(limit=20))]
    assert actions[:3] == ["enroll:request", "enroll:confirm", "enroll:approve"]


def test_inline_signed_confirm_works_too(world: World, cast: Cast) -> None:
    _, nonce = challenge(world)
    done = world.trust.enrollment.respond(inline_mail(cast.newbie, f"confirm {nonce}"), message_key=key())
    assert done.status == "verified"


# --------------------------------------------------------------------------- repeated and stale steps


def test_repeated_enroll_gets_the_pending_answer_not_a_new_challenge(world: World) -> None:
    first, _ = challenge(world)
    again = world.trust.enrollment.request("newbie@example.test")
    assert again.status == "pending" and "No new challenge" in again.reply
    assert again.request is not None and first.request is not None and again.request.id == first.request.id
    assert not re.search(r"confirm [0-9a-f]{32}", again.reply)
    assert len(world.store.find_enrollments(email="newbie@example.test")) == 1


def test_confirm_mail_replayed_and_nonce_reused(world: World, cast: Cast) -> None:
    out, nonce = challenge(world)
    reply = pgp_mime(cast.newbie, f"confirm {nonce}\n")
    assert world.trust.enrollment.respond(reply, message_key=key()).status == "verified"
    # the same mail again: answered, nothing changes
    again = world.trust.enrollment.respond(reply, message_key=key())
    assert again.status == "repeated" and "already confirmed" in again.reply
    # a new signed mail with the used nonce: same answer
    fresh = world.trust.enrollment.respond(pgp_mime(cast.newbie, f"confirm {nonce} (again)\n"),
                                           message_key=key())
    assert fresh.status == "repeated"
    assert out.request is not None
    record = world.store.get_enrollment(out.request.id)
    assert record is not None and record.state == "verified" and record.nonce_hash is None


def test_expired_challenge(world: World, cast: Cast, clock: Clock) -> None:
    out, nonce = challenge(world)
    clock.offset = world.config.auth.challenge_ttl + 1
    late = world.trust.enrollment.respond(pgp_mime(cast.newbie, f"confirm {nonce}\n"), message_key=key())
    assert late.status == "stale" and "send `enroll` again" in late.reply
    renewed = world.trust.enrollment.request("newbie@example.test")
    assert renewed.status == "challenged" and nonce_of(renewed) != nonce
    assert out.request is not None and renewed.request is not None and renewed.request.id != out.request.id


def test_wrong_nonce(world: World, cast: Cast) -> None:
    challenge(world)
    done = world.trust.enrollment.respond(pgp_mime(cast.newbie, "confirm " + "0" * 32 + "\n"),
                                          message_key=key())
    assert done.status == "wrong_nonce"


def test_quoted_nonce_does_not_confirm(world: World, cast: Cast) -> None:
    _, nonce = challenge(world)
    done = world.trust.enrollment.respond(pgp_mime(cast.newbie, f"thanks\n> confirm {nonce}\n"),
                                          message_key=key())
    assert done.status == "wrong_nonce"


def test_confirm_without_a_request(world: World, cast: Cast) -> None:
    done = world.trust.enrollment.respond(pgp_mime(cast.newbie, "confirm " + "a" * 32), message_key=key())
    assert done.status == "unknown" and "send `enroll` first" in done.reply


def test_already_enrolled_address(world: World) -> None:
    out = world.trust.enrollment.request("ops@example.test")
    assert out.status == "already_enrolled" and "revoke the old one" in out.reply


# --------------------------------------------------------------------------- forged steps


def test_confirm_signed_by_another_key_changes_nothing(world: World, cast: Cast) -> None:
    out, nonce = challenge(world)
    forged = pgp_mime(cast.stranger, f"confirm {nonce}\n", sender="newbie@example.test")
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.respond(forged, message_key=key())
    assert err.value.reason == "unknown_key"
    world.trust.keyring.gpg.import_keys(cast.ops.public_key())
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.respond(pgp_mime(cast.ops, f"confirm {nonce}\n", sender="newbie@example.test"),
                                       message_key=key())
    assert err.value.reason == "wrong_key"
    assert out.request is not None
    record = world.store.get_enrollment(out.request.id)
    assert record is not None and record.state == "challenged"


def test_unsigned_confirm(world: World) -> None:
    _, nonce = challenge(world)
    raw = (f"From: newbie@example.test\r\nTo: carrier@example.test\r\nSubject: x\r\n"
           f"Content-Type: text/plain\r\n\r\nconfirm {nonce}\r\n").encode()
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.respond(raw, message_key=key())
    assert err.value.reason == "unsigned"


def test_approve_from_a_non_admin(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.admin_mail(pgp_mime(cast.ops, f"approve {rid} as admin\n"), message_key=key())
    assert err.value.reason == "not_admin"
    assert world.store.list_audit(action="enroll:decide", limit=1)[0].outcome == "not_admin"


def test_approve_with_a_forged_admin_from(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    world.trust.finder.ensure("ops@example.test", cast.ops.fingerprint)  # known to Carrier, not the admin
    forged = pgp_mime(cast.ops, f"approve {rid} as admin\n", sender="admin@example.test")
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.admin_mail(forged, message_key=key())
    assert err.value.reason == "wrong_key"
    record = world.store.get_enrollment(rid)
    assert record is not None and record.state == "verified"


def test_unsigned_approve_from_the_admin_address(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    raw = (f"From: admin@example.test\r\nSubject: x\r\nContent-Type: text/plain\r\n\r\n"
           f"approve {rid} as admin\r\n").encode()
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.admin_mail(raw, message_key=key())
    assert err.value.reason == "unsigned"


def test_quoted_approve_inside_a_deny(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    text = f"deny {rid}\n\nOn Monday, Carrier wrote:\n> To decide, reply with ONE of these lines:\n" \
           f"> approve {rid} as <role>\n> APPROVE\n"
    out = world.trust.enrollment.admin_mail(pgp_mime(cast.admin, text), message_key=key())
    assert out.status == "denied" and [n.to for n in out.notices] == ["newbie@example.test"]
    assert world.trust.directory.identity("newbie@example.test") is None
    # a later approve is answered with the decision already taken
    late = world.trust.enrollment.admin_mail(pgp_mime(cast.admin, f"approve {rid}\n"), message_key=key())
    assert late.status == "repeated" and "already denied" in late.reply


def test_admin_mail_with_only_quoted_approve_decides_nothing(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    out = world.trust.enrollment.admin_mail(pgp_mime(cast.admin, f"ok!\n> approve {rid} as admin\n"),
                                            message_key=key())
    assert out.status == "refused" and "no decision found" in out.reply
    record = world.store.get_enrollment(rid)
    assert record is not None and record.state == "verified"


def test_replayed_admin_approval_runs_nothing(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    approval = pgp_mime(cast.admin, f"approve {rid} as operator\n")
    assert world.trust.enrollment.admin_mail(approval, message_key=key()).status == "approved"
    with pytest.raises(VerificationError) as err:
        world.trust.enrollment.admin_mail(approval, message_key=key())
    assert err.value.reason == "replay"


# --------------------------------------------------------------------------- storage and concurrency


def test_nonce_is_stored_only_as_its_hash(world: World, cast: Cast) -> None:
    out, nonce = challenge(world)
    assert out.request is not None and out.request.nonce_hash == nonce_hash(nonce)
    with sqlite3.connect(world.state / DB_NAME) as conn:
        dump = "\n".join(conn.iterdump())
    assert nonce not in dump and nonce_hash(nonce) in dump


def test_concurrent_enroll_mails_make_one_challenge(world: World) -> None:
    results: list[Outcome] = []

    def go() -> None:
        results.append(world.trust.enrollment.request("newbie@example.test"))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status for r in results)
    # Requests that all looked a key up at once may meet the per-address enrollment limit (3).
    assert statuses[0] == "challenged" and set(statuses[1:]) <= {"pending", "rate_limited"}, statuses
    assert statuses.count("rate_limited") <= 1
    assert len(world.store.find_enrollments(email="newbie@example.test")) == 1


def test_revoked_enrollment_stops_commands(world: World, cast: Cast) -> None:
    rid = confirmed(world, cast)
    world.trust.enrollment.approve(rid, by="cli:root", door="cli", role="operator")
    world.trust.mailauth.authenticate(pgp_mime(cast.newbie, "jobs -a\n"), message_key=key())
    out = world.trust.enrollment.revoke(cast.newbie.fingerprint, by="cli:root", door="cli")
    assert out.status == "revoked"
    with pytest.raises(VerificationError) as err:
        world.trust.mailauth.authenticate(pgp_mime(cast.newbie, "jobs -b\n"), message_key=key())
    assert err.value.reason == "not_enrolled"
    again = world.trust.enrollment.request("newbie@example.test")
    assert again.status == "refused" and "revoked" in again.reply
