"""Dovecot 2.3 for the sandbox: IMAP (plain + implicit TLS, IDLE) and LMTP delivery, with its own config.

Everything lives under ``layout.dovecot_dir`` (config, base_dir, state_dir, passwd-file); the system
``/etc/dovecot`` is never read. Mail is stored as Maildir under ``layout.mail_dir``, owned by the
``dovecot`` user, because Dovecot refuses a root mail uid.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.layout import DOMAIN, IDENTITIES, LOOPBACK, Layout, address
from carrier.tls import make_self_signed

#: Unix accounts the Debian package creates; login processes run as the first, mail as the second.
LOGIN_USER = "dovenull"
MAIL_USER = "dovecot"
#: Folders every mailbox gets, created and subscribed on first login, with their RFC 6154 flag.
SPECIAL_USE: dict[str, str] = {
    "Drafts": r"\Drafts",
    "Sent": r"\Sent",
    "Trash": r"\Trash",
    "Archive": r"\Archive",
    "Junk": r"\Junk",
}
TLS_HOSTS: tuple[str, ...] = ("localhost", LOOPBACK)


def ssha512(password: str) -> str:
    """A Dovecot ``{SSHA512}`` hash (salted SHA-512); stdlib only, since ``crypt`` is going away."""
    salt = secrets.token_bytes(16)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return "{SSHA512}" + base64.b64encode(digest + salt).decode()


def read_password(layout: Layout, identity: str) -> str:
    """The sandbox password of ``identity`` (first line of its password file)."""
    path = layout.password_file(identity)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SandboxError(
            f"cannot read {path} ({exc.strerror}): create the sandbox passwords before starting services"
        ) from exc
    if not lines or not lines[0]:
        raise SandboxError(f"{path} is empty: write the password for {identity} on its first line")
    return lines[0]


class Dovecot(procs.PidFileService):
    """The sandbox IMAP/LMTP server, run in the foreground (``-F``) so its pid is ours to stop."""

    name = "dovecot"
    stop_timeout = 10.0  # the master stops its children first

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.dir = layout.dovecot_dir
        self.config = self.dir / "dovecot.conf"
        self.passwd_file = self.dir / "passwd"
        self.oauth2_file = self.dir / "dovecot-oauth2.conf.ext"
        self.base_dir = self.dir / "run"
        self.state_dir = self.dir / "state"

    def ports(self) -> list[tuple[str, int, str]]:
        p = self.layout.ports
        return [
            (LOOPBACK, p.imap, "dovecot imap"),
            (LOOPBACK, p.imaps, "dovecot imaps"),
            (LOOPBACK, p.lmtp, "dovecot lmtp"),
        ]

    def _mail_account(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(MAIL_USER)
        except KeyError as exc:
            raise SandboxError(
                f"the {MAIL_USER} user does not exist: install dovecot with "
                "`apt-get install dovecot-imapd dovecot-lmtpd`"
            ) from exc

    def prepare(self) -> None:
        """Write dovecot.conf, the passwd-file, the TLS pair (if missing) and the mail directory."""
        if os.geteuid() != 0:
            raise SandboxError("dovecot needs root to switch to its mail user: run the sandbox as root")
        procs.find_binary("dovecot")
        account = self._mail_account()
        # Login processes run as dovenull and mail access as dovecot: both walk these paths.
        procs.check_traversable(self.layout.root, uid=account.pw_uid, gid=account.pw_gid, user=MAIL_USER)

        for directory in (self.dir, self.base_dir, self.state_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        self.layout.log_dir.mkdir(parents=True, exist_ok=True)
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)

        mail = self.layout.mail_dir
        mail.mkdir(parents=True, exist_ok=True)
        os.chown(mail, account.pw_uid, account.pw_gid)
        mail.chmod(0o700)

        if not (self.layout.tls_cert.exists() and self.layout.tls_key.exists()):
            make_self_signed(self.layout.tls_cert, self.layout.tls_key, hosts=TLS_HOSTS)

        self._write_passwd(account)
        self._write_oauth2()
        self._write_config(account)

    def _write_passwd(self, account: pwd.struct_passwd) -> None:
        """passwd-file serves both passdb and userdb, so LMTP refuses unknown users with 550."""
        lines = []
        for identity in IDENTITIES:
            home = self.layout.mail_dir / DOMAIN / identity
            hashed = ssha512(read_password(self.layout, identity))
            lines.append(f"{address(identity)}:{hashed}:{account.pw_uid}:{account.pw_gid}::{home}::\n")
        # The auth process runs as the dovecot user: root:dovecot 0640, nobody else reads the hashes.
        tmp = self.passwd_file.with_name("passwd.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(lines))
        os.chown(tmp, 0, account.pw_gid)
        tmp.chmod(0o640)
        os.replace(tmp, self.passwd_file)

    def _write_oauth2(self) -> None:
        """The oauth2 passdb: XOAUTH2/OAUTHBEARER tokens are checked by RFC 7662 introspection
        against the sandbox token server (the stand-in for the provider); no cache, so a revoked or
        expired token is refused at the next login."""
        url = f"http://{LOOPBACK}:{self.layout.ports.oauth}/introspect"
        self.oauth2_file.write_text(
            "# Written by `carrier sandbox`; rewritten on every prepare.\n"
            f"introspection_url = {url}\n"
            "introspection_mode = post\n"
            "force_introspection = yes\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "timeout_msecs = 10000\n"
        )
        self.oauth2_file.chmod(0o644)

    def _write_config(self, account: pwd.struct_passwd) -> None:
        p = self.layout.ports
        mailboxes = "".join(
            f"  mailbox {name} {{\n    special_use = {flag}\n    auto = subscribe\n  }}\n"
            for name, flag in SPECIAL_USE.items()
        )
        text = f"""\
# Written by `carrier sandbox`; rewritten on every prepare. Never includes /etc/dovecot.
protocols = imap lmtp
listen = {LOOPBACK}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_file}
info_log_path = {self.log_file}
instance_name = carrier-sandbox
# Dovecot refuses to run login processes or mail access as root.
default_login_user = {LOGIN_USER}
default_internal_user = {MAIL_USER}
first_valid_uid = {account.pw_uid}
last_valid_uid = 0
mail_uid = {account.pw_uid}
mail_gid = {account.pw_gid}
mail_location = maildir:~/Maildir

# Loopback only: plain-text logins are fine on the unencrypted port.
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_verbose = yes
ssl = yes
ssl_cert = <{self.layout.tls_cert}
ssl_key = <{self.layout.tls_key}

passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=SSHA512 {self.passwd_file}
}}
# OAuth2 (XOAUTH2 / OAUTHBEARER): access tokens from the sandbox token server.
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_file}
}}
userdb {{
  driver = passwd-file
  args = {self.passwd_file}
}}

namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}}}

service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {p.imap}
  }}
  inet_listener imaps {{
    address = {LOOPBACK}
    port = {p.imaps}
    ssl = yes
  }}
}}
# No per-IP auth penalty: every client is 127.0.0.1, so one wrong password (tests make them on
# purpose) would otherwise delay every later login by up to 15 s. auth_failure_delay still applies.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {LOOPBACK}
    port = {p.lmtp}
  }}
}}
# Log the RFC 2971 ID a client sends (tests check Carrier's).
protocol imap {{
  imap_id_log = *
}}
protocol lmtp {{
  postmaster_address = postmaster@{DOMAIN}
}}
"""
        self.config.write_text(text)
        self.config.chmod(0o644)

    def start(self) -> None:
        """Start dovecot in the foreground under our pid file; wait until IMAP, IMAPS and LMTP accept."""
        if self.running():
            return
        if not self.config.exists():
            raise SandboxError(f"{self.config} is missing: run prepare() (`carrier sandbox up`) first")
        dovecot = procs.find_binary("dovecot")
        # -F keeps the master in the foreground: the pid we record is the master's, and it never
        # holds a pipe of ours because spawn sends stdio to the log file.
        self.launch([dovecot, "-F", "-c", str(self.config)])
