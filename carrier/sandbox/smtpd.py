"""The sandbox SMTP server: an MX port and a submission port that deliver for real into Dovecot LMTP.

Run as its own process (``python -m carrier.sandbox.smtpd --root DIR``), started by `SmtpRelay`.

- MX (``ports.smtp``): no AUTH, accepts only ``@example.test`` recipients that Dovecot knows.
- Submission (``ports.submission``): STARTTLS with the sandbox certificate, then AUTH PLAIN/LOGIN
  (checked against the sandbox password files) or XOAUTH2/OAUTHBEARER (access tokens checked by
  introspection at the sandbox token server) before any mail; recipients only ``@example.test``.

The protocol machine is aiosmtpd's; `Delivery` (LMTP) and `SandboxHandler` (policy) are plain objects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import signal
import smtplib
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.layout import DOMAIN, IDENTITIES, LOOPBACK, Layout, address

log = logging.getLogger("carrier.sandbox.smtpd")

HOSTNAME = f"mx.{DOMAIN}"
LMTP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Outcome:
    """One recipient's LMTP result: ``code`` is an SMTP reply code (0 when the server was unreachable)."""

    recipient: str
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class Delivery:
    """Hands messages to Dovecot over LMTP, one recipient per transaction.

    One transaction per recipient because LMTP answers DATA once per recipient and
    smtplib.LMTP reads only the first of those replies.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def _connect(self) -> smtplib.LMTP:
        lmtp = smtplib.LMTP(self.host, self.port, timeout=LMTP_TIMEOUT)
        lmtp.ehlo(HOSTNAME)  # LMTP's LHLO
        return lmtp

    def check_recipient(self, recipient: str) -> Outcome:
        """Ask Dovecot whether it would take mail for ``recipient`` (MAIL/RCPT/RSET, no data)."""
        try:
            lmtp = self._connect()
        except (OSError, smtplib.SMTPException) as exc:
            return Outcome(recipient, 0, f"LMTP unreachable: {exc}")
        try:
            lmtp.mail("")
            code, text = lmtp.rcpt(recipient)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                lmtp.rset()
            return Outcome(recipient, code, text.decode(errors="replace"))
        except (OSError, smtplib.SMTPException) as exc:
            return Outcome(recipient, 0, f"LMTP failed: {exc}")
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                lmtp.quit()

    def deliver(self, sender: str, recipients: Sequence[str], content: bytes,
                mail_options: Sequence[str] = ()) -> list[Outcome]:
        """Deliver ``content`` to each recipient; every recipient gets an Outcome, never an exception."""
        try:
            lmtp = self._connect()
        except (OSError, smtplib.SMTPException) as exc:
            return [Outcome(r, 0, f"LMTP unreachable: {exc}") for r in recipients]
        outcomes: list[Outcome] = []
        try:
            for rcpt in recipients:
                outcomes.append(self._deliver_one(lmtp, sender, rcpt, content, mail_options))
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                lmtp.quit()
        return outcomes

    @staticmethod
    def _deliver_one(lmtp: smtplib.LMTP, sender: str, rcpt: str, content: bytes,
                     mail_options: Sequence[str]) -> Outcome:
        try:
            lmtp.sendmail(sender, [rcpt], content, mail_options=list(mail_options))
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[rcpt]
            return Outcome(rcpt, code, text.decode(errors="replace"))
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused
            reply: bytes | str = exc.smtp_error
            message = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
            return Outcome(rcpt, exc.smtp_code, message)
        except (OSError, smtplib.SMTPException) as exc:
            return Outcome(rcpt, 0, f"LMTP failed: {exc}")
        return Outcome(rcpt, 250, "delivered")


def summarize(outcomes: Sequence[Outcome]) -> str:
    """One SMTP reply for the whole message.

    Any temporary failure gives 451, so the client retries and nothing is lost silently (a retry may
    duplicate mail for recipients that already got it). Only permanent failures give 550.
    """
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return f"250 2.0.0 OK: delivered to {len(outcomes)} recipient(s)"
    detail = "; ".join(f"<{o.recipient}> {o.code or 'no reply'} {o.text}".strip() for o in failed)
    detail = " ".join(detail.split())[:400]  # one line, bounded
    if any(not o.permanent for o in failed):
        return f"451 4.3.0 Delivery deferred, try again later: {detail}"
    return f"550 5.0.0 Not delivered: {detail}"


def received_header(session: Any, envelope: Any, *, submission: bool) -> bytes:
    """A RFC 5321 trace header; the protocol keyword follows RFC 3848 (ESMTP, ESMTPS, ESMTPSA)."""
    peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
    helo = session.host_name or "unknown"
    proto = "ESMTP"
    if session.ssl is not None:
        proto += "S"
    if session.authenticated:
        proto += "A"
    rcpts = envelope.rcpt_tos
    for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    via = "submission" if submission else "mx"
    line = (
        f"Received: from {helo} ([{peer}])\r\n\tby {HOSTNAME} (Carrier sandbox {via}) with {proto} "
        f"id {secrets.token_hex(6)}{for_clause};\r\n\t{formatdate(localtime=False)}\r\n"
    )
    return line.encode("ascii", errors="replace")


class SandboxHandler:
    """aiosmtpd handler: recipient policy and delivery. LMTP calls run in a worker thread."""

    def __init__(self, delivery: Delivery, *, submission: bool, domain: str = DOMAIN) -> None:
        self.delivery = delivery
        self.submission = submission
        self.domain = domain.lower()

    def recipient_error(self, recipient: str) -> str | None:
        """The SMTP refusal for a recipient outside the sandbox domain, or None when it may be tried."""
        _, at, domain = recipient.rpartition("@")
        if at and domain.lower() == self.domain:
            return None
        if self.submission:
            return f"550 5.7.1 <{recipient}>: Relay access denied: only @{self.domain} recipients"
        return f"550 5.7.1 <{recipient}>: Relay access denied: this MX accepts mail for @{self.domain} only"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        refusal = self.recipient_error(address)
        if refusal is not None:
            log.info("refused rcpt %s from %s", address, session.peer)
            return refusal
        probe = await asyncio.to_thread(self.delivery.check_recipient, address)
        if probe.permanent:
            return f"550 5.1.1 <{address}>: {probe.text}"
        if not probe.ok:
            return f"451 4.3.0 <{address}>: cannot check recipient now: {probe.text}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content
        if isinstance(content, str):  # only with decode_data=True, which we never set
            content = content.encode()
        message = received_header(session, envelope, submission=self.submission) + content
        options = [o for o in envelope.mail_options if o.upper().startswith("BODY=")]
        outcomes = await asyncio.to_thread(
            self.delivery.deliver, envelope.mail_from or "", list(envelope.rcpt_tos), message, options
        )
        reply = summarize(outcomes)
        log.info("message from <%s> to %s: %s", envelope.mail_from, envelope.rcpt_tos, reply)
        return reply


def parse_oauth(mechanism: str, blob: bytes) -> tuple[str, str] | None:
    """``(user, access token)`` from an XOAUTH2 or OAUTHBEARER (RFC 7628) initial response."""
    text = blob.decode("utf-8", "replace")
    fields = text.split("\x01")
    user = ""
    if mechanism == "OAUTHBEARER":
        head = fields[0]  # the GS2 header: "n,a=<user>," (RFC 5801)
        if not head.startswith("n,"):
            return None
        authz = head[2:].rstrip(",")
        if authz.startswith("a="):
            user = authz[2:].replace("=2C", ",").replace("=3D", "=")
    token = ""
    for item in fields:
        if item.startswith("user="):
            user = item[5:]
        elif item.startswith("auth="):
            scheme, _, token = item[5:].partition(" ")
            if scheme.lower() != "bearer":
                return None
    return (user, token) if user and token else None


class OAuthSubmissionHandler(SandboxHandler):
    """The submission handler plus AUTH XOAUTH2 and OAUTHBEARER, checked by introspection.

    A refused token gets the provider-style 334 challenge with a JSON error (as Gmail sends), then
    535 once the client answers it.
    """

    def __init__(self, delivery: Delivery, introspection_url: str) -> None:
        super().__init__(delivery, submission=True)
        self.introspection_url = introspection_url

    def introspect(self, token: str) -> str | None:
        """The username the token belongs to, or None when it is not active."""
        body = urllib.parse.urlencode({"token": token}).encode()
        request = urllib.request.Request(self.introspection_url, data=body, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback URL)
                answer = json.loads(response.read())
        except (OSError, ValueError) as exc:
            log.warning("token introspection failed: %s", exc)
            return None
        return str(answer["username"]).lower() if answer.get("active") is True else None

    async def _oauth(self, server: Any, args: list[str], mechanism: str) -> Any:
        from aiosmtpd.smtp import MISSING, AuthResult

        if len(args) > 1:
            try:
                blob: Any = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        parsed = parse_oauth(mechanism, bytes(blob))
        owner = await asyncio.to_thread(self.introspect, parsed[1]) if parsed else None
        ok = parsed is not None and owner == parsed[0].lower()
        log.info("AUTH %s for %s from %s: %s", mechanism, parsed[0] if parsed else "?", server.session.peer,
                 "ok" if ok else "failed")
        if ok and parsed is not None:
            return AuthResult(success=True, handled=False, auth_data=parsed[0])
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"}).encode()
        if await server.challenge_auth(error) is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
        return await self._oauth(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> Any:
        return await self._oauth(server, args, "OAUTHBEARER")


class PasswordAuthenticator:
    """aiosmtpd authenticator: the login is a sandbox address, the password its password file's line.

    Password files are read at each attempt, so rotated passwords apply without a restart.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.logins = {address(i): i for i in IDENTITIES}

    def check(self, login: str, password: str) -> bool:
        identity = self.logins.get(login.lower())
        if identity is None:
            return False
        try:
            expected = self.layout.password_file(identity).read_text().splitlines()[0]
        except (OSError, IndexError):
            log.warning("cannot read the password file of %s", identity)
            return False
        return secrets.compare_digest(expected.encode(), password.encode())

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode(errors="replace")
        ok = self.check(login, auth_data.password.decode(errors="replace"))
        log.info("AUTH %s for %s from %s: %s", mechanism, login, session.peer, "ok" if ok else "failed")
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


def tls_context(layout: Layout) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(layout.tls_cert, layout.tls_key)
    return context


async def serve(layout: Layout) -> None:
    """Run both listeners until SIGTERM or SIGINT."""
    from aiosmtpd.smtp import SMTP

    delivery = Delivery(LOOPBACK, layout.ports.lmtp)
    mx = SandboxHandler(delivery, submission=False)
    sub = OAuthSubmissionHandler(delivery, f"http://{LOOPBACK}:{layout.ports.oauth}/introspect")
    context = tls_context(layout)
    authenticator = PasswordAuthenticator(layout)
    loop = asyncio.get_running_loop()

    def mx_protocol() -> SMTP:
        return SMTP(mx, hostname=HOSTNAME, ident="Carrier sandbox MX")

    def submission_protocol() -> SMTP:
        return SMTP(
            sub, hostname=HOSTNAME, ident="Carrier sandbox submission",
            tls_context=context, require_starttls=True,
            authenticator=authenticator, auth_required=True, auth_require_tls=True,
        )

    servers = [
        await loop.create_server(mx_protocol, LOOPBACK, layout.ports.smtp),
        await loop.create_server(submission_protocol, LOOPBACK, layout.ports.submission),
    ]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("listening: mx %s:%d, submission %s:%d, delivering to lmtp %s:%d",
             LOOPBACK, layout.ports.smtp, LOOPBACK, layout.ports.submission, LOOPBACK, layout.ports.lmtp)
    await stop.wait()
    log.info("stopping")
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    layout = procs.daemon_layout("carrier.sandbox.smtpd", (__doc__ or "").split("\n")[0], argv)
    try:
        asyncio.run(serve(layout))
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


class SmtpRelay(procs.PidFileService):
    """Starts and stops the SMTP process. Needs Dovecot's LMTP up before mail arrives."""

    name = "smtp"

    def ports(self) -> list[tuple[str, int, str]]:
        p = self.layout.ports
        return [(LOOPBACK, p.smtp, "smtp mx"), (LOOPBACK, p.submission, "smtp submission")]

    def prepare(self) -> None:
        """Check what the process will need; it reads ports from sandbox.json, so make that agree."""
        procs.ensure_meta(self.layout)
        for path in (self.layout.tls_cert, self.layout.tls_key):
            if not path.exists():
                raise SandboxError(f"{path} is missing: prepare Dovecot first (it makes the TLS pair)")

    def start(self) -> None:
        if self.running():
            return
        self.prepare()
        self.launch(*procs.python_module("carrier.sandbox.smtpd", "--root", str(self.layout.root)))


if __name__ == "__main__":
    sys.exit(main())
