"""Sending: one SMTP session per message (connect, TLS, login, send, quit), errors made actionable."""

from __future__ import annotations

import contextlib
import logging
import smtplib
from collections.abc import Sequence
from email.message import EmailMessage

from carrier.config import MailAccount
from carrier.mail.connect import DEFAULT_TIMEOUT, MailConnectError, smtp_connect
from carrier.mail.imap import MailError

log = logging.getLogger(__name__)


class SendError(MailError):
    """The SMTP server did not take the message."""


def _reply(code: int, text: bytes | str) -> str:
    words = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{code} {' '.join(words.split())}"[:300]


def send(
    account: MailAccount,
    message: EmailMessage,
    recipients: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, str]:
    """Send ``message`` from the account's address to ``recipients``.

    Returns the recipients the server refused (address → reply) when it took the message for the
    others; raises SendError when it took it for nobody, MailConnectError when it cannot be reached.
    """
    where = f"SMTP {account.smtp.host}:{account.smtp.port} for account {account.name}"
    session = smtp_connect(account, timeout=timeout)
    try:
        refused = session.send_message(message, from_addr=account.address, to_addrs=list(recipients))
    except smtplib.SMTPRecipientsRefused as exc:
        detail = "; ".join(f"{addr}: {_reply(code, text)}" for addr, (code, text) in exc.recipients.items())
        raise SendError(f"{where}: every recipient was refused ({detail})") from None
    except smtplib.SMTPSenderRefused as exc:
        raise SendError(
            f"{where}: sender {account.address} refused ({_reply(exc.smtp_code, exc.smtp_error)})"
        ) from None
    except smtplib.SMTPResponseException as exc:
        raise SendError(f"{where}: message refused ({_reply(exc.smtp_code, exc.smtp_error)})") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise MailConnectError(f"{where}: sending failed ({exc}); the message was not sent") from None
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            session.quit()
    problems = {addr: _reply(code, text) for addr, (code, text) in refused.items()}
    if problems:
        log.warning("some recipients refused", extra={"account": account.name, "refused": sorted(problems)})
    return problems
