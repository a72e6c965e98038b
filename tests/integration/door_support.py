"""Helpers for the email-door tests: a `carrier serve` subprocess on a private state directory,
signed command mails from the sandbox identities, and reading Carrier's replies from ops@'s inbox."""

from __future__ import annotations

import contextlib
import email
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from auth_support import NO_PASSPHRASE, GpgUser, KeyFactory, pgp_mime
from mail_support import deliver, imap_as, write_secret
from ruamel.yaml import YAML

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox, dump_yaml


def door_config(sandbox: Sandbox, directory: Path, **extra: Any) -> Path:
    """The sandbox carrier.yml with a private state directory (and ``extra`` top-level keys)."""
    data = YAML(typ="safe").load(sandbox.layout.config_file.read_text())
    data["state_dir"] = str(directory / "state")
    account_extra = extra.pop("account", {})
    data["accounts"][0].update(account_extra)
    data.update(extra)
    path = directory / "carrier.yml"
    write_secret(path, dump_yaml(data))
    return path


@dataclass
class Serve:
    """`carrier serve` as a subprocess; its JSON log lines are collected by a reader thread."""

    config: Path
    proc: subprocess.Popen[str] | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    #: stderr lines that are not JSON (there should be none: everything goes through Carrier's log).
    raw: list[str] = field(default_factory=list)
    #: What runs `carrier serve` (e.g. in a mount namespace); it must exec it, keeping the pid.
    prefix: tuple[str, ...] = ()
    _reader: threading.Thread = field(init=False, repr=False)

    def start(self, timeout: float = 90) -> Serve:
        self.lines = []
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "carrier", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ},
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self.wait_log("carrier ready", timeout)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.raw.append(line)

    def wait_log(self, msg: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("msg") == msg:
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line {msg!r}: {self.lines[-20:]}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"carrier serve did not stop within 90 s of SIGTERM: {self.lines[-30:]}") \
                from None
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


@contextlib.contextmanager
def serving(sandbox: Sandbox, **extra: Any) -> Iterator[tuple[Serve, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="cdoor-", dir="/var/tmp"))
    directory.chmod(0o700)
    serve = Serve(door_config(sandbox, directory, **extra))
    try:
        yield serve, directory
        if serve.proc is not None and serve.proc.poll() is None:
            serve.stop()
        # Everything `carrier serve` writes to stderr goes through its JSON logger (with redaction).
        assert not serve.raw, f"carrier serve wrote non-JSON lines to stderr: {serve.raw[:10]}"
    finally:
        if serve.proc is not None and serve.proc.poll() is None:
            serve.stop()
        subprocess.run(
            ["gpgconf", "--homedir", str(sandbox.layout.gnupg_home("carrier")), "--kill", "all"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def identities(sandbox: Sandbox) -> Iterator[dict[str, GpgUser]]:
    factory = KeyFactory()
    try:
        yield {
            name: factory.adopt(sandbox.layout.gnupg_home(name), address(name), name)
            for name in ("ops", "admin", "newbie")
        }
    finally:
        factory.close()


def send_signed(sandbox: Sandbox, user: GpgUser, text: str, subject: str) -> tuple[str, bytes]:
    """Deliver a PGP/MIME signed mail from ``user`` to carrier@; return (Message-ID, raw)."""
    raw = pgp_mime(user, text, subject=subject)
    message_id = email.message_from_bytes(raw)["Message-ID"]
    deliver(sandbox.layout, raw, sender=user.address, to=[address("carrier")])
    return message_id, raw


def store_keys(sandbox: Sandbox) -> dict[str, str]:
    """The store key (UIDVALIDITY and UID, see ``carrier.mail.gateway.message_key``) of every mail in
    carrier@'s INBOX, by its Message-ID (the first mail with that Message-ID)."""
    from carrier.mail.gateway import message_key

    with imap_as(sandbox.layout, "carrier") as client:
        info = client.select_folder("INBOX", readonly=True)
        validity = int(info[b"UIDVALIDITY"])
        uids = sorted(client.search("ALL"))
        data = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    out: dict[str, str] = {}
    for uid in uids:
        head = email.message_from_bytes(data[uid][b"BODY[HEADER.FIELDS (MESSAGE-ID)]"])
        out.setdefault(str(head.get("Message-ID", "")).strip(), message_key(validity, uid))
    return out


def store_key(sandbox: Sandbox, message_id: str, timeout: float = 30) -> str:
    """The store key of the mail with ``message_id`` in carrier@'s INBOX (waits for its delivery)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        key = store_keys(sandbox).get(message_id)
        if key is not None:
            return key
        time.sleep(0.05)
    raise AssertionError(f"no mail {message_id} in carrier@'s INBOX")


def replies_for(sandbox: Sandbox, identity: str, token: str) -> list[Message]:
    """Messages in ``identity``'s INBOX whose subject carries ``token`` (oldest first)."""
    with imap_as(sandbox.layout, identity) as client:
        client.select_folder("INBOX", readonly=True)
        uids = sorted(client.search(["SUBJECT", token]))
        if not uids:
            return []
        data = client.fetch(uids, ["BODY.PEEK[]"])
    return [email.message_from_bytes(data[u][b"BODY[]"], policy=default_policy) for u in uids]


def wait_replies(
    sandbox: Sandbox, identity: str, token: str, count: int, timeout: float = 120, settle: float = 0.0
) -> list[Message]:
    deadline = time.monotonic() + timeout
    found: list[Message] = []
    while time.monotonic() < deadline:
        found = replies_for(sandbox, identity, token)
        if len(found) >= count:
            if settle:
                time.sleep(settle)
                found = replies_for(sandbox, identity, token)
            return found
        time.sleep(0.1)
    raise AssertionError(f"{len(found)} of {count} replies for {token} in {identity}'s INBOX")


def text_of(message: Message) -> str:
    """All text/plain parts of a (signed) reply, joined."""
    out = []
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            out.append(part.get_content())
    return "\n".join(out)


def html_of(message: Message) -> str:
    return "\n".join(p.get_content() for p in message.walk() if p.get_content_type() == "text/html")


def db_rows(state: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(state / "carrier.db", timeout=30)) as conn:
        return list(conn.execute(sql, params).fetchall())


@dataclass
class LocalDoor:
    """The email door in this process (no IMAP): the real store, trust, job manager and outbox
    (not sending: replies stay queued in the store, where the tests read them)."""

    config: Any
    store: Any
    trust: Any
    jobs: Any
    door: Any
    directory: Path

    @property
    def account(self) -> Any:
        return self.config.default_account

    def handle(self, raw: bytes, key: str | None = None) -> str:
        """``raw`` through the listener's path (``carrier.mail.gateway.handle_mail``)."""
        from carrier.mail.gateway import handle_mail

        if key is None:
            key = email.message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")["Message-ID"]
        assert key
        return handle_mail(self.door, self.account, key, raw)

    def replies(self) -> list[Message]:
        """Every queued reply, oldest first."""
        rows = self.store.outbox_due(now=float("inf"), limit=1000)
        return [email.message_from_bytes(r.raw, policy=default_policy) for r in rows]

    def replies_to(self, message_id: str) -> list[Message]:
        return [m for m in self.replies() if m["In-Reply-To"] == message_id]

    def state(self, key: str) -> tuple[str, str | None]:
        record = self.store.get_message(self.account.name, key)
        assert record is not None, key
        return record.state, record.error

    def jobs_rows(self) -> list[tuple[Any, ...]]:
        return db_rows(self.directory / "state", "SELECT id, kind, target, spec FROM jobs")

    def wait_job(self, job_id: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.jobs.manager.get(job_id)
            if view.done:
                return view
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not done in {timeout} s")


@contextlib.contextmanager
def local_door(sandbox: Sandbox, *, proposer: Any = None, **extra: Any) -> Iterator[LocalDoor]:
    from carrier.auth.service import Trust
    from carrier.config import load_config
    from carrier.jobs.system import build_job_system
    from carrier.mail.door import MailDoor
    from carrier.mail.outbox import Outbox
    from carrier.store import Store

    directory = Path(tempfile.mkdtemp(prefix="cdoor-local-", dir="/var/tmp"))
    directory.chmod(0o700)
    config = load_config(door_config(sandbox, directory, **extra), os.environ)
    store = Store.open(config.state_dir, url=config.store.dsn())
    trust = Trust(config, store)
    jobs = build_job_system(config, store)
    jobs.manager.start()
    made = proposer(config, store, jobs) if proposer is not None else None
    door = MailDoor(config, store, trust, jobs, Outbox(config, store), proposer=made)
    try:
        yield LocalDoor(config, store, trust, jobs, door, directory)
    finally:
        jobs.close()
        if "keyring" in trust.__dict__:
            trust.keyring.stop_agent()
        store.close()
        subprocess.run(
            ["gpgconf", "--homedir", str(sandbox.layout.gnupg_home("carrier")), "--kill", "all"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        shutil.rmtree(directory, ignore_errors=True)


PGP_MESSAGE = b"-----BEGIN PGP MESSAGE-----"


def is_encrypted(message: Message) -> bool:
    """Whether a mail Carrier sent is RFC 3156 encrypted."""
    return message.get_content_type() == "multipart/encrypted"


def opened(user: GpgUser, message: Message) -> Message:
    """An encrypted mail from Carrier decrypted with the user's own gpg (signed by Carrier inside)."""
    raw = message.as_bytes()
    assert is_encrypted(message) and PGP_MESSAGE in raw
    status = subprocess.run(
        ["gpg", "--homedir", str(user.home), "--batch", "--status-fd", "2", *NO_PASSPHRASE, "--decrypt"],
        input=raw[raw.index(PGP_MESSAGE):], capture_output=True, timeout=60, check=True)
    assert b"DECRYPTION_OKAY" in status.stderr and b"GOODSIG" in status.stderr, status.stderr
    return email.message_from_bytes(status.stdout, policy=default_policy)
