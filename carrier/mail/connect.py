"""Open logged-in IMAP and SMTP connections for a configured account: the one place that maps
an account's TLS mode, port and credentials (a password, or OAuth2 access tokens) onto imapclient
and smtplib. A session logged in with an access token records when to re-authenticate it
(``reauth_due``), so long-lived connections (IDLE, the pool) are replaced before the token expires."""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import time
import weakref

from imapclient import IMAPClient

from carrier.config import ImapSettings, MailAccount, SmtpSettings
from carrier.errors import CarrierError
from carrier.mail import oauth
from carrier.tls import client_context

DEFAULT_TIMEOUT = 30.0
log = logging.getLogger(__name__)
_TLS_HINT = "trust the server's certificate with ca_file (or allow_self_signed)"


class MailConnectError(CarrierError):
    """A mail server could not be reached or refused the login."""


#: When each live IMAP session logged in with an access token should be re-authenticated.
_RENEW_AT: weakref.WeakKeyDictionary[IMAPClient, float] = weakref.WeakKeyDictionary()


def reauth_due(client: IMAPClient, *, now: float | None = None) -> bool:
    """True once a session's access token is near expiry: log in again on a new connection."""
    renew_at = _RENEW_AT.get(client)
    return renew_at is not None and (time.monotonic() if now is None else now) >= renew_at


def reauth_in(client: IMAPClient) -> float | None:
    """Seconds until ``reauth_due`` (None for a password session, which never needs it)."""
    renew_at = _RENEW_AT.get(client)
    return None if renew_at is None else max(0.0, renew_at - time.monotonic())


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
        _imap_login(client, account, where)
        send_imap_id(client, account)
    except oauth.OAuthError as exc:
        _close_imap(client)
        raise MailConnectError(f"{where}: {exc}") from None
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


def _imap_login(client: IMAPClient, account: MailAccount, where: str) -> None:
    if account.auth != "oauth2":
        client.login(account.username, account.password())
        return
    token = oauth.access_token(account)
    try:
        _imap_oauth(client, account, token.value)
    except IMAPClient.AbortError:
        raise
    except IMAPClient.Error:
        # A cached token the server no longer takes (revoked, clocks apart): one fresh try.
        oauth.forget(account)
        token = oauth.access_token(account)
        try:
            _imap_oauth(client, account, token.value)
        except IMAPClient.AbortError:
            raise
        except IMAPClient.Error as exc:
            raise oauth.OAuthError(
                f"{oauth.sasl_mechanism(account)} login as {account.username} refused with a fresh "
                f"access token ({_server_text(exc)}): check that the token's account is {account.username} "
                f"and its scope allows IMAP, or run `carrier auth mail-login {account.name}`"
            ) from None
    _RENEW_AT[client] = token.renew_at


def _imap_oauth(client: IMAPClient, account: MailAccount, token: str) -> None:
    response = oauth.sasl_response(account, token)
    # The first continuation gets the initial response; a second one carries the server's JSON
    # error (RFC 7628 section 3.2.2) and is answered empty, so the server ends with NO.
    answers = iter([response])
    client._imap.authenticate(oauth.sasl_mechanism(account), lambda _challenge: next(answers, ""))


def _server_text(text: object) -> str:
    shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return " ".join(shown.split())[:200]


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
            _smtp_login(session, account)
        except oauth.OAuthError as exc:
            session.close()
            raise MailConnectError(f"{where}: {exc}") from None
        except smtplib.SMTPException as exc:
            session.close()
            raise MailConnectError(f"{where}: login as {account.username} refused ({exc})") from None
    return session


def _smtp_login(session: smtplib.SMTP, account: MailAccount) -> None:
    if account.auth != "oauth2":
        session.login(account.username, account.password())
        return
    mechanism = oauth.sasl_mechanism(account)

    def attempt() -> None:
        response = oauth.sasl_response(account, oauth.access_token(account).value)

        def answer(challenge: bytes | None = None) -> str:
            return response if challenge is None else ""  # a challenge is the server's JSON error

        session.auth(mechanism, answer, initial_response_ok=True)

    try:
        attempt()
    except smtplib.SMTPAuthenticationError:
        oauth.forget(account)  # a cached token the server no longer takes: one fresh try
        try:
            attempt()
        except smtplib.SMTPAuthenticationError as exc:
            raise oauth.OAuthError(
                f"{mechanism} login as {account.username} refused with a fresh access token "
                f"({exc.smtp_code} {_server_text(exc.smtp_error)}): check the "
                f"token's account and scope, or run `carrier auth mail-login {account.name}`"
            ) from None
