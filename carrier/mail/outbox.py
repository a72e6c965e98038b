"""The persistent outbox: replies are stored before they are sent, and sent with retries.

``queue`` writes the composed bytes to the store (idempotent per Message-ID, so a resumed mail
never queues its reply twice). ``deliver_due`` sends what is due: each row is first claimed for a
short while (compare-and-set in the store) so two Carrier processes never send it at once; a
failure reschedules it with exponential backoff and jitter. A permanent refusal (5xx for every
recipient) marks it ``failed`` with the server's answer; a message is never dropped silently.

The one window left is SMTP's own: a crash after the server took the message and before the row
is marked sent makes it go again once the claim expires (SMTP has no idempotent submit).
"""

from __future__ import annotations

import contextlib
import logging
import random
import smtplib
import threading
from collections.abc import Callable, Sequence

from carrier.config import Config, MailAccount
from carrier.errors import CarrierError
from carrier.mail.connect import MailConnectError, smtp_connect
from carrier.store import OutboxRecord, Store
from carrier.store import gateway as sql

log = logging.getLogger(__name__)

BACKOFF_BASE = 5.0
BACKOFF_MAX = 3600.0
#: How long a sender holds a row while it talks to the SMTP server.
CLAIM_SECONDS = 300.0


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


class Outbox:
    """Queue and send replies for the accounts of one configuration."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        send: Sender | None = None,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_MAX,
    ) -> None:
        self.config = config
        self.store = store
        self._send = send or (lambda account, raw, rcpts: smtp_send_raw(account, raw, rcpts))
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
        if not sql.claim_outbox(self.store, record.id, record.next_attempt_at, now + CLAIM_SECONDS):
            return False  # another sender has it
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
        return True

    def deliver_due(self, limit: int = 50) -> int:
        """Send every due message once; return how many went out."""
        return sum(1 for record in self.store.outbox_due(limit=limit) if self._deliver(record))

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
            self.wake.wait(wait)
