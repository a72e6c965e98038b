"""Real mail servers of the sandbox: Dovecot (IMAP/IMAPS/LMTP), the SMTP relay and the VKS keyserver.

The fixture here starts the three components directly; it moves to conftest (via the orchestrator)
once that exists.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import smtplib
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from imapclient import IMAPClient

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.dovecot import Dovecot
from carrier.sandbox.keyserver import Keyserver
from carrier.sandbox.layout import IDENTITIES, LOOPBACK, Layout, Ports, address
from carrier.sandbox.smtpd import SmtpRelay

pytestmark = pytest.mark.sandbox


@dataclass
class MailBox:
    """A started set of mail components in one sandbox directory."""

    layout: Layout
    dovecot: Dovecot
    smtp: SmtpRelay
    keyserver: Keyserver

    @property
    def components(self) -> tuple[Dovecot, SmtpRelay, Keyserver]:
        return (self.dovecot, self.smtp, self.keyserver)

    def password(self, identity: str) -> str:
        return self.layout.password_file(identity).read_text().strip()

    def imap(self, identity: str) -> IMAPClient:
        client = IMAPClient(LOOPBACK, port=self.layout.ports.imap, ssl=False, timeout=10)
        client.login(address(identity), self.password(identity))
        return client

    def inbox_uids_with_subject(self, identity: str, subject: str) -> list[int]:
        with self.imap(identity) as client:
            client.select_folder("INBOX", readonly=True)
            return list(client.search(["SUBJECT", subject]))

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()


def _write_passwords(layout: Layout) -> None:
    layout.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    layout.secrets_dir.chmod(0o700)
    for identity in IDENTITIES:
        path = layout.password_file(identity)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(18) + "\n")


def _write_ops_key(layout: Layout) -> None:
    """A real armored public key for ops, made with gpg in a throwaway home."""
    gpg = procs.find_binary("gpg")
    home = layout.root / "gpg-fixture"
    home.mkdir(mode=0o700)
    base = [gpg, "--homedir", str(home), "--batch", "--no-tty"]
    try:
        procs.run_checked([*base, "--passphrase", "", "--quick-gen-key", f"Ops <{address('ops')}>",
                           "ed25519", "sign", "1d"], what="gpg key generation")
        armored = procs.run_checked([*base, "--armor", "--export", address("ops")], what="gpg export")
    finally:
        gpgconf = shutil.which("gpgconf")
        if gpgconf:  # the agent gpg started for this home must not outlive the test
            subprocess.run([gpgconf, "--homedir", str(home), "--kill", "all"], check=False,
                           capture_output=True)
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    layout.keyserver_dir.mkdir(parents=True, exist_ok=True)
    (layout.keyserver_dir / f"{address('ops')}.asc").write_text(armored)


@pytest.fixture(scope="module")
def sandbox_root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the mail sandbox needs root (dovecot switches to its mail user)")
    root = Path(tempfile.mkdtemp(prefix="carrier-mail-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start(root: Path, offset: int) -> MailBox:
    layout = Layout(root, Ports.with_offset(offset))
    root.mkdir(parents=True, exist_ok=True)
    _write_passwords(layout)
    box = MailBox(layout, Dovecot(layout), SmtpRelay(layout), Keyserver(layout))
    procs.ensure_ports_free([p for c in box.components for p in c.ports()])
    try:
        for component in box.components:  # dovecot first: it makes the TLS pair, smtp needs LMTP
            component.prepare()
            component.start()
    except BaseException:
        box.stop()
        raise
    return box


@pytest.fixture(scope="module")
def mail(sandbox_root: Path) -> Iterator[MailBox]:
    layout_root = sandbox_root / "main"
    layout_root.mkdir(mode=0o755)
    box = _start(layout_root, 300)
    try:
        _write_ops_key(box.layout)
        yield box
    finally:
        box.stop()


@pytest.fixture
def spare(sandbox_root: Path) -> Iterator[MailBox]:
    """A second, short-lived set of servers (other ports) for tests that stop things."""
    root = sandbox_root / f"spare-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    box = _start(root, 350)
    try:
        yield box
    finally:
        box.stop()


def _unique(tag: str) -> str:
    return f"carrier-{tag}-{uuid.uuid4().hex}"


def _swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([procs.find_binary("swaks"), "--timeout", "20", *args],
                          capture_output=True, text=True, timeout=60, check=False)


# --- Dovecot -----------------------------------------------------------------------------------

def test_swaks_on_mx_is_delivered_to_imap(mail: MailBox) -> None:
    subject = _unique("mx")
    body = f"body line {uuid.uuid4().hex}"
    done = _swaks("--server", f"{LOOPBACK}:{mail.layout.ports.smtp}", "--to", address("ops"),
                  "--from", address("admin"), "--header", f"Subject: {subject}", "--body", body)
    assert done.returncode == 0, done.stdout + done.stderr

    with mail.imap("ops") as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search(["SUBJECT", subject])
        assert len(uids) == 1
        fetched = client.fetch(uids, ["BODY.PEEK[]"])[uids[0]][b"BODY[]"].decode()
    assert body in fetched
    assert f"Subject: {subject}" in fetched
    # Our trace header is on top, naming the MX path.
    assert fetched.startswith("Return-Path:") or fetched.startswith("Received:")
    assert "by mx.example.test (Carrier sandbox mx) with ESMTP" in fetched
    assert f"for <{address('ops')}>" in fetched


def test_imaps_verifies_cert_and_lists_special_use(mail: MailBox) -> None:
    context = ssl.create_default_context(cafile=str(mail.layout.tls_cert))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    with IMAPClient(LOOPBACK, port=mail.layout.ports.imaps, ssl=True, ssl_context=context,
                    timeout=10) as client:
        client.login(address("newbie"), mail.password("newbie"))
        folders = {name: flags for flags, _sep, name in client.list_folders()}
    assert {"INBOX", "Sent", "Drafts", "Trash", "Archive", "Junk"} <= set(folders)
    assert rb"\Sent" in folders["Sent"]
    assert rb"\Trash" in folders["Trash"]


def test_imaps_rejects_an_untrusted_cert(mail: MailBox) -> None:
    context = ssl.create_default_context()  # system CAs only: our self-signed cert is unknown
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient(LOOPBACK, port=mail.layout.ports.imaps, ssl=True, ssl_context=context, timeout=10)


def test_wrong_imap_password_is_refused(mail: MailBox) -> None:
    client = IMAPClient(LOOPBACK, port=mail.layout.ports.imap, ssl=False, timeout=10)
    try:
        with pytest.raises(IMAPClient.Error):
            client.login(address("ops"), "not-the-password")
    finally:
        client.shutdown()


def test_idle_is_advertised_and_wakes_on_delivery(mail: MailBox) -> None:
    with mail.imap("admin") as client:
        assert b"IDLE" in client.capabilities()
        assert b"SPECIAL-USE" in client.capabilities()
        client.select_folder("INBOX")
        client.idle()
        try:
            done = _swaks("--server", f"{LOOPBACK}:{mail.layout.ports.smtp}", "--to", address("admin"),
                          "--from", address("ops"), "--header", f"Subject: {_unique('idle')}")
            assert done.returncode == 0, done.stdout
            responses = client.idle_check(timeout=10)
        finally:
            client.idle_done()
    assert any(len(r) >= 2 and r[1] == b"EXISTS" for r in responses), responses


# --- SMTP --------------------------------------------------------------------------------------

def test_submission_requires_starttls_before_auth(mail: MailBox) -> None:
    with smtplib.SMTP(LOOPBACK, mail.layout.ports.submission, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("auth")  # not even offered in clear text
        assert smtp.has_extn("starttls")
        code, _ = smtp.docmd("AUTH", "PLAIN AG9wc0BleGFtcGxlLnRlc3QAeA==")
        assert code == 530
        code, _ = smtp.docmd("MAIL", "FROM:<ops@example.test>")
        assert code == 530


def test_submission_after_starttls_delivers_to_newbie(mail: MailBox) -> None:
    subject = _unique("sub")
    body = f"hello newbie {uuid.uuid4().hex}"
    message = (f"From: {address('ops')}\r\nTo: {address('newbie')}\r\nSubject: {subject}\r\n\r\n"
               f"{body}\r\n")
    context = ssl.create_default_context(cafile=str(mail.layout.tls_cert))
    with smtplib.SMTP(LOOPBACK, mail.layout.ports.submission, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo("client.test")
        assert smtp.has_extn("auth")
        smtp.login(address("ops"), mail.password("ops"))
        refused = smtp.sendmail(address("ops"), [address("newbie")], message)
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            smtp.sendmail(address("ops"), ["someone@elsewhere.invalid"], message)
        assert exc.value.recipients["someone@elsewhere.invalid"][0] == 550

    with mail.imap("newbie") as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search(["SUBJECT", subject])
        assert len(uids) == 1
        fetched = client.fetch(uids, ["BODY.PEEK[]"])[uids[0]][b"BODY[]"].decode()
    assert body in fetched
    assert "with ESMTPSA" in fetched


def test_submission_wrong_password_is_535(mail: MailBox) -> None:
    context = ssl.create_default_context(cafile=str(mail.layout.tls_cert))
    with smtplib.SMTP(LOOPBACK, mail.layout.ports.submission, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            smtp.login(address("ops"), mail.password("ops") + "x")
        assert exc.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            smtp.login("ops@elsewhere.invalid", mail.password("ops"))
        assert exc.value.smtp_code == 535


def test_mx_refuses_foreign_recipients_and_delivers_nothing(mail: MailBox) -> None:
    subject = _unique("relay")
    done = _swaks("--server", f"{LOOPBACK}:{mail.layout.ports.smtp}", "--to", "victim@elsewhere.invalid",
                  "--from", address("ops"), "--header", f"Subject: {subject}")
    assert done.returncode != 0
    assert "550 5.7.1" in done.stdout

    with smtplib.SMTP(LOOPBACK, mail.layout.ports.smtp, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("auth")
        smtp.mail(address("ops"))
        code, text = smtp.rcpt("victim@elsewhere.invalid")
        assert code == 550 and b"Relay access denied" in text
        code, text = smtp.rcpt("nobody@example.test")  # Dovecot has no such user
        assert code == 550 and b"5.1.1" in text

    for identity in IDENTITIES:
        assert mail.inbox_uids_with_subject(identity, subject) == []


def test_lmtp_down_gives_451_not_silent_loss(spare: MailBox) -> None:
    ports = spare.layout.ports
    with smtplib.SMTP(LOOPBACK, ports.smtp, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(address("ops"))
        assert smtp.rcpt(address("ops"))[0] == 250
        spare.dovecot.stop()  # LMTP vanishes between RCPT and DATA
        code, text = smtp.data(f"Subject: {_unique('defer')}\r\n\r\nbody\r\n")
        assert code == 451, text
        smtp.rset()
        smtp.mail(address("ops"))
        assert smtp.rcpt(address("ops"))[0] == 451


# --- keyserver ---------------------------------------------------------------------------------

def _get(mail: MailBox, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(LOOPBACK, mail.layout.ports.keyserver, timeout=10)
    try:
        conn.request("GET", path)  # raw path: no client-side normalisation of ../
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def test_keyserver_by_email_serves_the_key_file(mail: MailBox) -> None:
    expected = (mail.layout.keyserver_dir / f"{address('ops')}.asc").read_text()
    status, content_type, body = _get(mail, "/vks/v1/by-email/ops%40example.test")
    assert status == 200
    assert content_type == "application/pgp-keys"
    assert body == expected
    assert body.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_keyserver_unknown_address_is_404(mail: MailBox) -> None:
    status, _, body = _get(mail, "/vks/v1/by-email/stranger%40example.test")
    assert status == 404
    assert "No key found" in body and "stranger@example.test" in body


def test_keyserver_rejects_traversal(mail: MailBox) -> None:
    secret = mail.password("ops")
    # A symlink inside the key dir must not lead out of it either.
    link = mail.layout.keyserver_dir / "evil@example.test.asc"
    link.symlink_to(mail.layout.password_file("ops"))
    try:
        for path in (
            "/vks/v1/by-email/..%2Fsecrets%2Fops.pass",
            "/vks/v1/by-email/../secrets/ops.pass",
            "/vks/v1/by-email/..%2F..%2Fetc%2Fpasswd",
            "/vks/v1/by-email/ops%40example.test%2F..%2F..%2Fsecrets%2Fops",
            "/vks/v1/by-email/a..b%40example.test",
            "/vks/v1/by-email/evil%40example.test",
            "/vks/v1/by-fingerprint/..%2F..%2Fsecrets%2Fops.pass",
        ):
            status, _, body = _get(mail, path)
            assert status in (400, 404), path
            assert secret not in body and "root:" not in body
    finally:
        link.unlink()


def test_keyserver_by_fingerprint(mail: MailBox) -> None:
    fpr = "0123456789ABCDEF0123456789ABCDEF01234567"
    key = mail.layout.keyserver_dir / f"{fpr}.asc"
    key.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\nfake\n-----END PGP PUBLIC KEY BLOCK-----\n")
    try:
        assert _get(mail, f"/vks/v1/by-fingerprint/{fpr}")[0] == 200
        assert _get(mail, f"/vks/v1/by-fingerprint/{fpr.lower()}")[0] == 400
        assert _get(mail, f"/vks/v1/by-fingerprint/{'F' * 40}")[0] == 404
    finally:
        key.unlink()


# --- lifecycle ---------------------------------------------------------------------------------

def test_stop_ends_processes_and_frees_ports(spare: MailBox) -> None:
    pids = {name: pid for c in spare.components for name, pid in c.pids().items()}
    assert set(pids) == {"dovecot", "smtp", "keyserver"}
    assert all(pid is not None and procs.pid_alive(pid) for pid in pids.values()), pids
    assert all(c.running() for c in spare.components)

    spare.stop()

    for pid in pids.values():
        assert pid is not None and not procs.pid_alive(pid)
    for component in spare.components:
        assert not component.running()
        assert all(v is None for v in component.pids().values())
        for host, port, what in component.ports():
            assert procs.port_is_free(host, port), what
    spare.stop()  # stopping again is fine
    # SIGTERM took the clean path (no SIGKILL after the timeout): each server logged its shutdown.
    assert "stopping" in spare.layout.log_file("smtp").read_text()
    assert "stopped" in spare.layout.log_file("keyserver").read_text()


def test_unreachable_sandbox_dir_is_explained(sandbox_root: Path) -> None:
    private = sandbox_root / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    layout = Layout(private / "box", Ports.with_offset(360))
    with pytest.raises(SandboxError, match=r"private is mode 0700: the dovecot user cannot reach .*box"
                                           r".*/var/tmp .*or `chmod o\+x "):
        Dovecot(layout).prepare()
    assert not layout.dovecot_dir.exists()  # refused before writing anything
