"""Open logged-in IMAP and SMTP connections for a configured account: the one place that maps
an account's TLS mode, port and credentials onto imapclient and smtplib."""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl

from imapclient import IMAPClient

from carrier.config import ImapSettings, MailAccount, SmtpSettings
from carrier.errors import CarrierError
from carrier.tls import client_context

DEFAULT_TIMEOUT = 30.0
log = logging.getLogger(__name__)
_TLS_HINT = "trust the server's certificate with ca_file (or allow_self_signed)"


class MailConnectError(CarrierError):
    """A mail server could not be reached or refused the login."""


def _context(settings: ImapSettings | SmtpSettings) -> ssl.SSLContext:
    return client_context(ca_file=settings.ca_file, allow_self_signed=settings.allow_self_signed)


def imap_connect(account: MailAccount, *, timeout: float = DEFAULT_TIMEOUT) -> IMAPClient:
    """A logged-in IMAPClient for ``account``; MailConnectError says which step failed."""
    imap = account.imap
    where = f"IMAP {imap.host}:{imap.port} ({imap.tls}) for account {account.name}"
    try:
        client = IMAPClient(
            imap.host,
            port=imap.port,
            ssl=imap.tls == "implicit",
            ssl_context=_context(imap) if imap.tls == "implicit" else None,
            timeout=timeout,
        )
        if imap.tls == "starttls":
            client.starttls(_context(imap))
        # Small commands and replies in lock-step: send each at once rather than batching (Nagle).
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except ssl.SSLError as exc:
        raise MailConnectError(f"{where}: TLS failed ({exc.reason}): {_TLS_HINT}") from None
    except OSError as exc:
        raise MailConnectError(f"{where}: cannot connect ({exc})") from None
    except IMAPClient.Error as exc:  # no greeting, or the server refused STARTTLS
        raise MailConnectError(f"{where}: no usable IMAP session ({exc}): is it an IMAP server?") from None
    try:
        client.login(account.username, account.password())
        send_imap_id(client, account)
    except IMAPClient.AbortError as exc:
        _close_imap(client)
        raise MailConnectError(f"{where}: connection lost while logging in ({exc})") from None
    except IMAPClient.Error as exc:
        _close_imap(client)
        raise MailConnectError(f"{where}: login as {account.username} refused ({exc})") from None
    except OSError as exc:
        _close_imap(client)
        raise MailConnectError(f"{where}: connection lost while logging in ({exc})") from None
    return client


def send_imap_id(client: IMAPClient, account: MailAccount) -> dict[str, str] | None:
    """RFC 2971 ID with the account's ``imap_id`` fields, when it has some and the server offers ID
    (163/126 mail refuse SELECT until a client has said who it is). Returns what the server said
    of itself; a refusal is logged, not fatal (ID is advisory everywhere else)."""
    if not account.imap_id or not client.has_capability("ID"):
        return None
    try:
        answer = client.id_(dict(account.imap_id))
    except IMAPClient.AbortError:
        raise
    except IMAPClient.Error as exc:
        log.warning("the IMAP server refused ID", extra={"account": account.name, "error": str(exc)[:200]})
        return None
    items = list(answer[0]) if answer and isinstance(answer[0], tuple | list) else []
    text = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items]
    return dict(zip(text[0::2], text[1::2], strict=False))


def _close_imap(client: IMAPClient) -> None:
    try:
        client.logout()
    except (IMAPClient.Error, OSError):
        client.shutdown()


def smtp_connect(account: MailAccount, *, timeout: float = DEFAULT_TIMEOUT) -> smtplib.SMTP:
    """An SMTP session for ``account``, TLS set up and logged in when the account says so."""
    smtp = account.smtp
    where = f"SMTP {smtp.host}:{smtp.port} ({smtp.tls}) for account {account.name}"
    try:
        session: smtplib.SMTP
        if smtp.tls == "implicit":
            session = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=timeout, context=_context(smtp))
        else:
            session = smtplib.SMTP(smtp.host, smtp.port, timeout=timeout)
            if smtp.tls == "starttls":
                session.ehlo()
                session.starttls(context=_context(smtp))
        session.ehlo()
    except ssl.SSLError as exc:
        raise MailConnectError(f"{where}: TLS failed ({exc.reason}): {_TLS_HINT}") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise MailConnectError(f"{where}: cannot connect ({exc})") from None
    if smtp.auth:
        try:
            session.login(account.username, account.password())
        except smtplib.SMTPException as exc:
            session.close()
            raise MailConnectError(f"{where}: login as {account.username} refused ({exc})") from None
    return session
