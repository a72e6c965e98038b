"""The persistent outbox: replies are stored before they are sent, and sent with retries.

``queue`` writes the composed bytes to the store (idempotent per Message-ID, so a resumed mail
never queues its reply twice). ``deliver_due`` sends what is due: each row is first claimed for a
short while (compare-and-set in the store) so two Carrier processes never send it at once; a
failure reschedules it with exponential backoff and jitter. A permanent refusal (5xx for every
recipient) marks it ``failed`` with the server's answer; a message is never dropped silently.

The one window left is SMTP's own: a crash after the server took the message and before the row
is marked sent makes it go again once the claim is taken over (SMTP has no idempotent submit).

A claim names its holder (``carrier.mail.lease``): a claim of a sender that no longer runs is taken
over at once, not after ``CLAIM_SECONDS``. Mails of one thread go out in order: a job's result or
progress mail waits while the command mail that started the job is not finished (its reply is not
queued yet) and while an earlier mail of the same thread is pending, for at most
``ORDER_HOLD_SECONDS`` (a reply that cannot be sent does not hold the results back for ever).
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import smtplib
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser

from carrier.config import Config, MailAccount
from carrier.errors import CarrierError
from carrier.mail.connect import MailConnectError, imap_connect, smtp_connect
from carrier.mail.imap import save_sent_copy
from carrier.mail.lease import owner_alive, owner_token
from carrier.store import OutboxRecord, Store
from carrier.store import gateway as sql

log = logging.getLogger(__name__)

BACKOFF_BASE = 5.0
BACKOFF_MAX = 3600.0
#: How long a sender holds a row while it talks to the SMTP server.
CLAIM_SECONDS = 300.0
#: The longest a job's mail waits for the mails before it in its thread.
ORDER_HOLD_SECONDS = 600.0
#: How often the sender looks again while every due mail waits for another one.
HELD_POLL = 1.0
_JOB_MAIL_RE = re.compile(r"<(?:result|progress)\.(j-[a-z0-9]+)[.@]")
_OPEN_MAIL_STATES = ("received", "processing")


def job_of_mail(message_id: str) -> str | None:
    """The job a result/progress mail reports on (from its Message-ID), else None."""
    match = _JOB_MAIL_RE.match(message_id)
    return match.group(1) if match else None


def _thread_of(head: bytes) -> str | None:
    value = BytesHeaderParser().parsebytes(head).get("In-Reply-To")
    return str(value).strip() or None if value is not None else None


def held_back(
    heads: Iterable[sql.OutboxHead], now: float, command_state: Callable[[str], str | None]
) -> set[int]:
    """Ids of pending rows that must wait for another mail of their thread (see the module doc)."""
    pending = list(heads)
    threads = {h.outbox_id: _thread_of(h.head) for h in pending}
    held: set[int] = set()
    for row in pending:
        job = job_of_mail(row.message_id)
        if job is None or now - row.created_at >= ORDER_HOLD_SECONDS:
            continue
        if command_state(job) in _OPEN_MAIL_STATES:
            held.add(row.outbox_id)  # the command's reply is not even queued yet
            continue
        thread = threads[row.outbox_id]
        if thread is None:
            continue
        for other in pending:
            if other.outbox_id == row.outbox_id or other.account != row.account:
                continue
            if threads[other.outbox_id] != thread:
                continue
            # Before a job's mail: the thread's other replies, and job mails queued earlier.
            if job_of_mail(other.message_id) is None or other.outbox_id < row.outbox_id:
                held.add(row.outbox_id)
                break
    return held


class PermanentFailure(CarrierError):
    """The server refused the message for good (5xx for every recipient)."""


def backoff(
    attempts: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_MAX,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds before attempt ``attempts + 1``: doubling from ``base`` up to ``cap``, with ±20 % jitter."""
    delay = min(cap, base * (2 ** max(0, attempts - 1)))
    return float(delay * (0.8 + 0.4 * rng()))


def smtp_send_raw(
    account: MailAccount, raw: bytes, recipients: Sequence[str], *, timeout: float = 30.0
) -> None:
    """Send ``raw`` unchanged (a signed message must keep its bytes). Raises MailConnectError for a
    temporary failure, PermanentFailure when every recipient was refused with a 5xx answer."""
    where = f"SMTP {account.smtp.host}:{account.smtp.port} for account {account.name}"
    session = smtp_connect(account, timeout=timeout)
    try:
        refused = session.sendmail(account.address, list(recipients), raw)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        detail = "; ".join(f"{a}: {c}" for a, (c, _) in exc.recipients.items())
        if all(500 <= c < 600 for c in codes):
            raise PermanentFailure(f"{where}: every recipient was refused ({detail})") from None
        raise MailConnectError(f"{where}: recipients refused for now ({detail})") from None
    except smtplib.SMTPResponseException as exc:
        if 500 <= exc.smtp_code < 600 and not isinstance(exc, smtplib.SMTPSenderRefused):
            raise PermanentFailure(f"{where}: message refused ({exc.smtp_code})") from None
        raise MailConnectError(f"{where}: sending failed ({exc.smtp_code}); will retry") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise MailConnectError(f"{where}: sending failed ({exc}); will retry") from None
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            session.quit()
    if refused:
        log.warning("some recipients refused", extra={"account": account.name, "refused": sorted(refused)})


Sender = Callable[[MailAccount, bytes, Sequence[str]], None]
#: Saves a sent message to the account's Sent folder; returns the folder (None: there is none).
Saver = Callable[[MailAccount, bytes], "str | None"]


def imap_save_sent(account: MailAccount, raw: bytes, *, timeout: float = 30.0) -> str | None:
    """APPEND ``raw`` to the account's Sent folder over a connection of its own."""
    client = imap_connect(account, timeout=timeout)
    try:
        return save_sent_copy(client, account, raw, datetime.now(UTC))
    finally:
        with contextlib.suppress(Exception):
            client.logout()


class Outbox:
    """Queue and send replies for the accounts of one configuration."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        send: Sender | None = None,
        save_sent: Saver | None = None,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_MAX,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        #: This sender's name on its claims (``carrier.mail.lease``).
        self.owner = owner or owner_token()
        #: Due rows left waiting for another mail of their thread in the last pass.
        self.held: set[int] = set()
        self._send = send or (lambda account, raw, rcpts: smtp_send_raw(account, raw, rcpts))
        self._save_sent = save_sent or imap_save_sent
        self.base = base
        self.cap = cap
        #: Set to make the sender loop look at the queue now (a reply was just queued).
        self.wake = threading.Event()

    def queue(self, account: str, message_id: str, recipients: Sequence[str], raw: bytes) -> int:
        """Store a composed message for sending; the same Message-ID again returns the same row."""
        outbox_id = self.store.outbox_put(account, message_id, recipients, raw)
        self.wake.set()
        return outbox_id

    def _deliver(self, record: OutboxRecord) -> bool:
        now = self.store.clock()
        if not sql.claim_outbox(self.store, record.id, record.next_attempt_at, now + CLAIM_SECONDS,
                                self.owner):
            return False  # another sender has it
        try:
            return self._send_claimed(record)
        finally:
            sql.release_outbox_claim(self.store, record.id, self.owner)

    def _send_claimed(self, record: OutboxRecord) -> bool:
        try:
            account = self.config.account(record.account)
        except CarrierError as exc:
            self.store.outbox_mark_failed(record.id, f"unknown account: {exc}")
            return False
        try:
            self._send(account, record.raw, record.recipients)
        except PermanentFailure as exc:
            self.store.outbox_mark_failed(record.id, str(exc))
            log.error("reply refused for good", extra={"outbox": record.id, "error": str(exc)})
            return False
        except Exception as exc:  # any other failure is temporary: the row stays and is retried
            delay = backoff(record.attempts + 1, base=self.base, cap=self.cap)
            self.store.outbox_mark_failed(record.id, str(exc)[:500], retry_at=self.store.clock() + delay)
            log.warning(
                "reply not sent, will retry",
                extra={
                    "outbox": record.id,
                    "attempt": record.attempts + 1,
                    "retry_in": round(delay, 1),
                    "error": str(exc)[:300],
                },
            )
            return False
        self.store.outbox_mark_sent(record.id)
        log.info("reply sent", extra={"outbox": record.id, "message_id": record.message_id})
        if account.save_sent:
            self._copy_to_sent(account, record)
        return True

    def _copy_to_sent(self, account: MailAccount, record: OutboxRecord) -> None:
        """The Sent copy of a row already marked sent: a failure is logged, the mail never goes again."""
        try:
            folder = self._save_sent(account, record.raw)
        except Exception as exc:  # the mail is out; nothing here may undo or repeat that
            log.error(
                "reply sent, but its copy was not saved to Sent",
                extra={"outbox": record.id, "account": account.name, "message_id": record.message_id,
                       "error": str(exc)[:300]},
            )
            return
        if folder is None:
            log.warning(
                "reply sent, but the account has no Sent folder for its copy",
                extra={"outbox": record.id, "account": account.name,
                       "hint": f"no \\Sent SPECIAL-USE folder and no folder {account.folders.sent!r}: "
                               "create it, set folders.sent, or save_sent: false"},
            )

    def take_over_dead_claims(self) -> int:
        """Make rows claimed by senders that no longer run due now; return how many."""
        taken = 0
        for claim in sql.outbox_claims(self.store):
            if claim.owner != self.owner and not owner_alive(claim.owner) \
                    and sql.take_over_outbox(self.store, claim):
                log.info("outbox claim of a stopped sender taken over",
                         extra={"outbox": claim.outbox_id, "holder": claim.owner})
                taken += 1
        return taken

    def deliver_due(self, limit: int = 50) -> int:
        """Send every due message once, in thread order; return how many went out."""
        self.take_over_dead_claims()
        due = self.store.outbox_due(limit=limit)
        held = held_back(sql.outbox_heads(self.store), self.store.clock(),
                         lambda job: sql.command_state_of_job(self.store, job)) if due else set()
        self.held = {r.id for r in due} & held
        return sum(1 for record in due if record.id not in held and self._deliver(record))

    def next_due_in(self) -> float | None:
        """Seconds until the next pending message is due (None: nothing pending)."""
        due = sql.outbox_next_due(self.store)
        return None if due is None else max(0.0, due - self.store.clock())

    def run(self, stop: threading.Event, *, idle: float = 5.0) -> None:
        """Send until ``stop`` is set: at once when woken, else when the next message is due."""
        while not stop.is_set():
            self.wake.clear()
            try:
                self.deliver_due()
            except Exception:  # the sender must outlive a broken row or a store hiccup
                log.exception("outbox loop error")
            due = self.next_due_in()
            wait = idle if due is None else min(idle, max(0.05, due))
            if self.held and due == 0.0:  # what is due waits for another mail: no busy loop
                wait = min(idle, HELD_POLL)
            self.wake.wait(wait)
