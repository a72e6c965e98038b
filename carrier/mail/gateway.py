"""The email door's listener: new mail in the command folder goes to ``MailDoor.process``.

Per account, one thread: connect, catch up on everything not yet handled, then wait for new mail
with IMAP IDLE (``IdleWatcher``, renewed before the 29-minute limit) or, when the server lacks
IDLE or ``idle: false``, poll every ``check_interval`` seconds. A dropped connection is retried
with exponential backoff and jitter; every reconnect catches up first, so nothing is missed.
A mail another Carrier instance is working on (its lease is held: several instances on one
PostgreSQL store and one mailbox) is looked at again after ``BUSY_RETRY`` seconds, not only at the
next change in the folder: if that instance dies, its mail is taken over as soon as its lease shows
it dead (``carrier.mail.lease``).

A handled mail gets the keyword ``CarrierDone`` (and stays where it is); catch-up searches for
mail without it. The store decides what was handled (``claim_message``), the keyword only saves
work: a mail whose keyword was lost is recognised as done and just flagged again. Servers that
take no keywords get ``\\Seen`` instead. Mail larger than ``mail.max_message_bytes`` is never fetched:
it is recorded as dropped and flagged.

A mail's store key is what the server guarantees unique, UIDVALIDITY and UID (``message_key``),
never its Message-ID: the sender picks that, so an unsigned forgery arriving first with the
Message-ID of a later signed mail would otherwise claim it. A signed mail delivered twice (two
UIDs) is caught by the trust layer's replay check on the signature digest. Rows of Carrier before
this change are keyed by Message-ID; they are not consulted (a mail among them that lost its
keyword is checked again under its UID key, and the replay check keeps it from running twice).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import time
from typing import Any

from imapclient import IMAPClient

from carrier.config import MailAccount
from carrier.errors import CarrierError
from carrier.mail.connect import MailConnectError, imap_connect, reauth_due
from carrier.mail.door import MailDoor
from carrier.mail.imap import IdleWatcher, MailError, check_folder, select

log = logging.getLogger(__name__)

DONE_KEYWORD = b"CarrierDone"
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
#: How soon a pass that met mail held by another instance looks again.
BUSY_RETRY = 5.0


def reconnect_delay(failures: int, rng: Any = random.random) -> float:
    """Seconds to wait after ``failures`` failed connects in a row: doubling, capped, ±30 % jitter
    (many Carrier processes dropped by one server restart must not come back in step)."""
    delay = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** max(0, failures - 1)))
    return float(delay * (0.7 + 0.6 * rng()))


def message_key(validity: int, uid: int, folder: str | None = None) -> str:
    """The store key of a mail: its UIDVALIDITY and UID (plus a digest of the folder when it is not
    the account's inbox: two folders may share a UIDVALIDITY). Never its Message-ID (see above)."""
    if validity < 0 or uid <= 0:
        raise ValueError(f"UIDVALIDITY {validity} / UID {uid} cannot identify a mail")
    if folder is None:
        return f"uid:{validity}:{uid}"
    digest = hashlib.sha256(folder.encode()).hexdigest()[:12]
    return f"uid:{digest}:{validity}:{uid}"


def handle_mail(door: MailDoor, account: MailAccount, key: str, raw: bytes) -> str:
    """One fetched mail through the door, as the listener does it: a mail broken beyond parsing
    (a MIME bomb too deep for the parser, undecodable headers) is recorded as dropped, never
    retried and never answered, and the listener goes on with the next one."""
    try:
        return door.process(account, key, raw)
    except (RecursionError, ValueError, UnicodeError, LookupError) as exc:
        return door.drop(account, key, f"unreadable mail: {type(exc).__name__}")


class Listener:
    """Watches one account's command folder until ``stop`` is set."""

    def __init__(
        self,
        door: MailDoor,
        account: MailAccount,
        stop: threading.Event,
        *,
        folder: str | None = None,
        idle: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.door = door
        self.account = account
        self.stop_event = stop
        self.folder = check_folder(folder or account.folders.inbox)
        #: Part of the store key unless this is the account's inbox (keys of the inbox stay short).
        self._key_folder = None if self.folder == check_folder(account.folders.inbox) else self.folder
        self.idle = account.idle if idle is None else idle
        self.interval = float(account.check_interval if interval is None else interval)
        self._client: IMAPClient | None = None
        self._watcher: IdleWatcher | None = None
        self._use_keyword = True
        #: Mails of the last pass that another instance held (looked at again after BUSY_RETRY).
        self.busy = 0
        #: Counters for logs and tests.
        self.handled = 0
        self.passes = 0
        self.reconnects = 0
        self.mode = "idle" if self.idle else "poll"
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Listener:
        self._thread = threading.Thread(
            target=self.run, name=f"carrier-mail-{self.account.name}", daemon=True
        )
        self._thread.start()
        return self

    def wake_up(self) -> None:
        """Break a blocking IDLE wait (used at shutdown)."""
        for client in (self._watcher.client if self._watcher else None, self._client):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.shutdown()

    @property
    def thread(self) -> threading.Thread | None:
        """The listener's thread (None before ``start``)."""
        return self._thread

    def join(self, timeout: float = 10.0) -> None:
        self.wake_up()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                self._session()
                failures = 0
            except (CarrierError, IMAPClient.Error, OSError, EOFError) as exc:
                if self.stop_event.is_set():
                    break
                failures += 1
                self.reconnects += 1
                delay = reconnect_delay(failures)
                log.warning(
                    "mail listener lost its connection; reconnecting",
                    extra={
                        "account": self.account.name,
                        "error": str(exc)[:300],
                        "retry_in": round(delay, 2),
                    },
                )
                self.stop_event.wait(delay)
            except Exception:  # never let one bad mail or bug end the listener
                log.exception("mail listener error", extra={"account": self.account.name})
                failures += 1
                self.stop_event.wait(reconnect_delay(failures))
            finally:
                self._close()
        log.info("mail listener stopped", extra={"account": self.account.name})

    def _close(self) -> None:
        watcher, self._watcher = self._watcher, None
        client, self._client = self._client, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                watcher.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.logout()

    def _session(self) -> None:
        self._client = imap_connect(self.account)
        if self.idle:
            try:
                self._watcher = IdleWatcher(self.account, self.folder)
                self.mode = "idle"
            except MailError as exc:
                if isinstance(exc, MailConnectError):
                    raise
                log.info("no IMAP IDLE: polling", extra={"account": self.account.name, "error": str(exc)})
                self.mode = "poll"
        log.info(
            "mail listener connected",
            extra={"account": self.account.name, "folder": self.folder, "mode": self.mode},
        )
        while not self.stop_event.is_set():
            self.catch_up()
            if reauth_due(self._client) or (self._watcher is not None and self._watcher.reauth_due):
                # OAuth2: the access token is near expiry; a new session logs in with a fresh one.
                log.info("mail listener re-authenticating", extra={"account": self.account.name})
                return
            wait = min(self.interval, BUSY_RETRY) if self.busy else self.interval
            if self._watcher is not None:
                # A change wakes us; the timeout only bounds how long a missed notice could wait.
                self._watcher.wait(wait)
            else:
                self.stop_event.wait(wait)

    # ----------------------------------------------------------------- catch-up

    def catch_up(self) -> int:
        """Handle every mail in the folder not yet marked done; return how many were handled."""
        client = self._client
        assert client is not None
        info = select(client, self.folder, readonly=False)
        validity = int(info.get(b"UIDVALIDITY", 0) or 0)
        permanent = [bytes(f) for f in info.get(b"PERMANENTFLAGS", ())]
        self._use_keyword = b"\\*" in permanent
        criteria: list[Any] = (
            ["UNKEYWORD", DONE_KEYWORD.decode(), "NOT", "DELETED"]
            if self._use_keyword
            else ["UNSEEN", "NOT", "DELETED"]
        )
        uids = sorted(client.search(criteria))
        self.passes += 1
        count = busy = 0
        for uid in uids:
            if self.stop_event.is_set():
                break
            if self._handle(client, validity, uid) == "busy":
                busy += 1
            count += 1
        self.handled += count
        self.busy = busy
        return count

    def _mark_done(self, client: IMAPClient, uid: int) -> None:
        flag = DONE_KEYWORD if self._use_keyword else b"\\Seen"
        client.add_flags([uid], [flag], silent=True)

    def _handle(self, client: IMAPClient, validity: int, uid: int) -> str | None:
        """Handle one mail; return the door's outcome (None: nothing to do, or already done)."""
        data = client.fetch([uid], ["RFC822.SIZE"]).get(uid)
        if not data:
            return None  # expunged meanwhile
        size = int(data.get(b"RFC822.SIZE", 0) or 0)
        key = message_key(validity, uid, self._key_folder)
        store = self.door.store
        record = store.get_message(self.account.name, key)
        if record is not None and record.state in ("done", "failed"):
            self._mark_done(client, uid)
            return None
        limit = self.door.config.mail.max_message_bytes
        if size > limit:
            outcome = self.door.drop(self.account, key, f"too large ({size} bytes > {limit})")
            self._mark_done(client, uid)
            return outcome
        body = client.fetch([uid], ["BODY.PEEK[]"]).get(uid)
        if not body:
            return None
        raw = bytes(body.get(b"BODY[]", b"") or b"")
        started = time.monotonic()
        outcome = handle_mail(self.door, self.account, key, raw)
        log.info(
            "mail handled",
            extra={
                "account": self.account.name,
                "key": key,
                "uid": uid,
                "outcome": outcome,
                "ms": round((time.monotonic() - started) * 1000),
            },
        )
        if outcome != "busy":
            self._mark_done(client, uid)
        return outcome
