"""The listener's pure parts and the outbox's retry logic over a real store (carrier.mail.*)."""

from __future__ import annotations

import email
from collections.abc import Sequence
from email.policy import compat32
from pathlib import Path

import pytest

from carrier.config import load_config
from carrier.mail.door import robot_reason
from carrier.mail.gateway import message_key, reconnect_delay
from carrier.mail.outbox import ORDER_HOLD_SECONDS, Outbox, PermanentFailure, backoff, held_back, job_of_mail
from carrier.mail.parse import parse_headers
from carrier.procid import boot_id
from carrier.store import Store
from carrier.store import gateway as sql


def test_message_key_is_what_the_server_guarantees_never_the_message_id() -> None:
    # The sender picks the Message-ID: keyed by it, a forgery arriving first would claim a later mail.
    assert message_key(7, 42) == "uid:7:42"
    assert message_key(7, 43) != message_key(7, 42) != message_key(8, 42)
    # Another folder may share the inbox's UIDVALIDITY: its keys differ.
    other = message_key(7, 42, "Commands")
    assert other.startswith("uid:") and other.endswith(":7:42") and other != message_key(7, 42)
    with pytest.raises(ValueError, match="cannot identify"):
        message_key(7, 0)


def test_reconnect_delay_doubles_with_jitter_and_a_cap() -> None:
    assert reconnect_delay(1, rng=lambda: 0.5) == pytest.approx(1.0)
    assert reconnect_delay(4, rng=lambda: 0.5) == pytest.approx(8.0)
    assert reconnect_delay(40, rng=lambda: 1.0) == pytest.approx(300 * 1.3)
    assert reconnect_delay(3, rng=lambda: 0.0) == pytest.approx(4 * 0.7)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("Auto-Submitted: auto-replied", "auto-submitted"),
        ("Precedence: bulk", "precedence"),
        ("Precedence: junk", "precedence"),
        ("Precedence: list", "precedence"),
        ("Return-Path: <>", "null sender"),
        ("List-Id: <ops.example.test>", "list"),
        ("X-Autoreply: yes", "auto-reply"),
    ],
)
def test_robots_are_never_answered(extra: str, reason: str) -> None:
    raw = f"From: ops@example.test\r\n{extra}\r\nSubject: x\r\n\r\n".encode()
    head = email.message_from_bytes(raw, policy=compat32)
    assert robot_reason(parse_headers(raw), head, ["carrier@example.test"]) == reason


def test_people_and_own_mail() -> None:
    for sender, expected in (
        ("ops@example.test", None),
        ("carrier@example.test", "own mail"),
        ("MAILER-DAEMON@example.test", "robot sender"),
    ):
        raw = f"From: {sender}\r\nAuto-Submitted: no\r\nSubject: x\r\n\r\n".encode()
        head = email.message_from_bytes(raw, policy=compat32)
        assert robot_reason(parse_headers(raw), head, ["carrier@example.test"]) == expected


def test_backoff_grows_and_is_capped() -> None:
    assert backoff(1, rng=lambda: 0.5) == pytest.approx(5.0)
    assert backoff(3, rng=lambda: 0.5) == pytest.approx(20.0)
    assert backoff(50, rng=lambda: 0.5) == pytest.approx(3600.0)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    web1: {}\n")
    (tmp_path / "pass").write_text("x\n")
    (tmp_path / "pass").chmod(0o600)
    path = tmp_path / "carrier.yml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\ninventory: {tmp_path / 'inv.yml'}\naccounts:\n"
        f"  - name: carrier\n    address: carrier@example.test\n    username: carrier@example.test\n"
        f"    password_file: {tmp_path / 'pass'}\n    imap: {{host: 127.0.0.1, port: 1}}\n"
        f"    smtp: {{host: 127.0.0.1, port: 1}}\n"
    )
    path.chmod(0o600)
    return path


def test_outbox_retries_until_sent_and_never_twice(config: Path, tmp_path: Path,
                                                   store_url: str | None) -> None:
    now = [1000.0]
    cfg = load_config(config, {})
    store = Store.open(tmp_path / "state", clock=lambda: now[0], url=store_url)
    sent: list[bytes] = []
    failures = [2]

    def send(account: object, raw: bytes, rcpts: Sequence[str]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError("connection refused")
        sent.append(raw)

    box = Outbox(cfg, store, send=send, base=10.0)
    first = box.queue("carrier", "<r1@example.test>", ["ops@example.test"], b"raw reply")
    assert box.queue("carrier", "<r1@example.test>", ["ops@example.test"], b"raw reply") == first
    assert box.deliver_due() == 0  # attempt 1 fails
    record = store.outbox_get(first)
    assert record is not None and record.state == "pending" and record.attempts == 1
    assert record.next_attempt_at > now[0] and "refused" in (record.last_error or "")
    assert box.deliver_due() == 0  # not due yet: nothing tried
    now[0] += 15
    assert box.deliver_due() == 0  # attempt 2 fails
    now[0] += 40
    assert box.deliver_due() == 1
    assert box.deliver_due() == 0
    assert sent == [b"raw reply"]
    record = store.outbox_get(first)
    assert record is not None and record.state == "sent" and record.attempts == 3
    store.close()


def test_outbox_permanent_refusal_is_kept_as_failed(config: Path, tmp_path: Path,
                                                    store_url: str | None) -> None:
    cfg = load_config(config, {})
    store = Store.open(tmp_path / "state", url=store_url)

    def send(account: object, raw: bytes, rcpts: Sequence[str]) -> None:
        raise PermanentFailure("550 no such user")

    box = Outbox(cfg, store, send=send)
    oid = box.queue("carrier", "<r2@example.test>", ["nobody@example.test"], b"x")
    assert box.deliver_due() == 0
    record = store.outbox_get(oid)
    assert record is not None and record.state == "failed" and "550" in (record.last_error or "")
    store.close()


def reply_bytes(thread: str, text: str) -> bytes:
    return f"From: carrier@example.test\r\nIn-Reply-To: {thread}\r\n\r\n{text}".encode()


def test_a_dead_senders_claim_is_taken_over_at_once(config: Path, tmp_path: Path,
                                                     store_url: str | None) -> None:
    cfg = load_config(config, {})
    store = Store.open(tmp_path / "state", url=store_url)
    sent: list[bytes] = []
    box = Outbox(cfg, store, send=lambda account, raw, rcpts: sent.append(raw))
    oid = box.queue("carrier", "<ack@example.test>", ["ops@example.test"], b"ack")
    record = store.outbox_get(oid)
    assert record is not None
    # A sender on this machine (pid 1's start identity never matches this one: it no longer
    # runs) claimed it.
    dead = f"1|{boot_id()}/not-the-start-of-pid-1|abc"
    assert sql.claim_outbox(store, oid, record.next_attempt_at, store.clock() + 300, dead)
    assert box.deliver_due() == 1 and sent == [b"ack"]
    # A live sender's claim (this process) is respected until it runs out.
    other = Outbox(cfg, store, send=lambda account, raw, rcpts: sent.append(raw))
    oid2 = box.queue("carrier", "<ack2@example.test>", ["ops@example.test"], b"ack2")
    record = store.outbox_get(oid2)
    assert record is not None
    assert sql.claim_outbox(store, oid2, record.next_attempt_at, store.clock() + 300, box.owner)
    assert other.deliver_due() == 0 and sent == [b"ack"]
    # A sender on another machine (another boot id) cannot be looked up: its claim runs out.
    oid3 = box.queue("carrier", "<ack3@example.test>", ["ops@example.test"], b"ack3")
    record = store.outbox_get(oid3)
    assert record is not None
    assert sql.claim_outbox(store, oid3, record.next_attempt_at, store.clock() + 300,
                            "1|another-boot/123|abc")
    assert other.deliver_due() == 0 and sent == [b"ack"]
    store.close()


def test_a_jobs_mails_wait_for_the_reply_of_their_thread() -> None:
    def head(oid: int, message_id: str, thread: str, created: float = 100.0) -> sql.OutboxHead:
        return sql.OutboxHead(oid, "carrier", message_id, reply_bytes(thread, "x"), created)

    ack = head(1, "<a1@example.test>", "<cmd1@x>")
    result = head(2, "<result.j-aaaaaaaaaaaa@example.test>", "<cmd1@x>")
    progress = head(3, "<progress.j-bbbbbbbbbbbb.1@example.test>", "<cmd2@x>")
    later = head(4, "<result.j-bbbbbbbbbbbb@example.test>", "<cmd2@x>")
    elsewhere = head(5, "<result.j-cccccccccccc@example.test>", "<cmd3@x>")
    done = {"j-aaaaaaaaaaaa": "done", "j-bbbbbbbbbbbb": "done", "j-cccccccccccc": "done"}
    assert held_back([ack, result, progress, later, elsewhere], 110.0, done.get) == {2, 4}
    # The result was queued before the reply: it waits while the command mail is being handled.
    assert held_back([result], 110.0, {"j-aaaaaaaaaaaa": "processing"}.get) == {2}
    assert held_back([result], 110.0, done.get) == set()
    # A reply that cannot go out holds the results back for ORDER_HOLD_SECONDS at most.
    assert held_back([ack, result], 100.0 + ORDER_HOLD_SECONDS, done.get) == set()
    assert job_of_mail("<progress.j-bbbbbbbbbbbb.1@example.test>") == "j-bbbbbbbbbbbb"
    assert job_of_mail("<a1@example.test>") is None


def test_listeners_run_only_for_command_accounts(tmp_path: Path) -> None:
    from carrier.serve import command_accounts

    (tmp_path / "inventory").write_text("all: {}\n")
    account = (
        "  - name: {n}\n    address: {n}@example.test\n    password_env: PW\n"
        "    imap: {{host: 127.0.0.1, tls: none}}\n    smtp: {{host: 127.0.0.1, tls: none}}\n"
    )
    text = "inventory: inventory\naccounts:\n" + "".join(
        account.format(n=n) for n in ("cmd", "tools", "more")
    )
    path = tmp_path / "carrier.yml"
    path.write_text(text)
    path.chmod(0o600)
    config = load_config(path, {"HOME": str(tmp_path), "PW": "secret"})
    assert [a.name for a in command_accounts(config)] == ["cmd"]
    turned_on = text.replace("name: more\n", "name: more\n    commands: true\n")
    path.write_text(turned_on)
    config = load_config(path, {"HOME": str(tmp_path), "PW": "secret"})
    assert [a.name for a in command_accounts(config)] == ["cmd", "more"]
