"""Load ``carrier.yml``: typed settings, environment overrides, secrets by reference.

The format is the contract in docs/configuration.md. Reading is schema-driven: every section is a
table of fields (converter + default); one reader checks unknown keys, inline secrets and types for
all of them, and small builders add the checks that span fields. Every problem is collected, so
``carrier check`` can list them all at once. Nothing here touches the network or creates anything.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import shlex
import stat
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from carrier.ansible.strategy import DEFAULT_STRATEGY, STRATEGIES
from carrier.ansible.zygote import DEFAULT_WORKER, WORKERS
from carrier.errors import ConfigError
from carrier.jobs.ptyoutputs import DEFAULT_OUTPUT as TMUX_OUTPUT
from carrier.jobs.ptyoutputs import OUTPUTS as TMUX_OUTPUTS

TlsMode = Literal["implicit", "starttls", "none"]
MailAuth = Literal["password", "oauth2"]
OAuth2Mechanism = Literal["xoauth2", "oauthbearer"]
#: Provider presets of ``oauth2.provider`` (their URLs and scopes live in carrier.mail.oauth).
OAUTH2_PROVIDERS = ("google", "microsoft", "custom")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CONFIG = Path(".config/carrier/carrier.yml")  # under the home directory
DEFAULT_STATE_DIR = Path(".local/state/carrier")  # under the home directory
DEFAULT_PORTS: Mapping[str, Mapping[str, int]] = {
    "imap": {"implicit": 993, "starttls": 143, "none": 143},
    "smtp": {"implicit": 465, "starttls": 587, "none": 25},
}
DEFAULT_TLS: Mapping[str, TlsMode] = {"imap": "implicit", "smtp": "starttls"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigProblems(ConfigError):
    """A :class:`ConfigError` that carries every problem found, one message per entry."""

    def __init__(self, problems: Sequence[str], source: Path | None = None) -> None:
        self.problems: list[str] = list(problems)
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{head}{len(self.problems)} problems:\n{lines}"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# The typed settings
# ---------------------------------------------------------------------------------------------


def _no_env() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class ImapSettings:
    host: str
    port: int
    tls: TlsMode = "implicit"
    ca_file: Path | None = None
    allow_self_signed: bool = False


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    host: str
    port: int
    tls: TlsMode = "starttls"
    ca_file: Path | None = None
    allow_self_signed: bool = False
    auth: bool = True


@dataclass(frozen=True, kw_only=True)
class Folders:
    inbox: str = "INBOX"
    sent: str = "Sent"
    drafts: str = "Drafts"
    trash: str = "Trash"
    archive: str = "Archive"
    junk: str = "Junk"


#: The ID fields RFC 2971 allows a client to send (each value at most 1024 characters).
IMAP_ID_FIELDS = ("name", "version", "os", "os-version", "vendor", "support-url", "address", "date",
                  "command", "arguments", "environment")


def default_imap_id() -> Mapping[str, str]:
    """What Carrier says it is when an account does not configure ``imap_id``."""
    from carrier import __version__

    return MappingProxyType({"name": "Carrier", "version": __version__, "vendor": "Carrier"})


@dataclass(frozen=True, kw_only=True)
class OAuth2Settings:
    """``oauth2:`` of an account with ``auth: oauth2``; the refresh token is the account's password."""

    provider: str = "custom"
    client_id: str
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    #: Override (or, for ``custom``, set) the provider's token and device-authorization endpoints.
    token_url: str | None = None
    device_url: str | None = None
    #: Space-separated scopes; None: the preset's.
    scope: str | None = None
    #: Microsoft Entra tenant (``common``, ``consumers``, ``organizations`` or a tenant id).
    tenant: str = "common"
    mechanism: OAuth2Mechanism = "xoauth2"
    environ: Mapping[str, str] = field(default_factory=_no_env, repr=False, compare=False)

    def client_secret(self) -> str | None:
        """The client secret, read now from its file or variable; None for a public client."""
        if not (self.client_secret_file or self.client_secret_env):
            return None
        try:
            return _read_secret(self.client_secret_env, self.client_secret_file, self.environ)
        except _Invalid as exc:
            raise ConfigProblems([f"oauth2 client secret: {exc}"]) from None


@dataclass(frozen=True, kw_only=True)
class MailAccount:
    name: str
    address: str
    username: str
    #: The name in From: of mail Carrier sends (``Name <address>``).
    display_name: str = "Carrier"
    password_env: str | None = None
    password_file: Path | None = None
    imap: ImapSettings
    smtp: SmtpSettings
    folders: Folders = field(default_factory=Folders)
    idle: bool = True
    check_interval: int = 60
    #: Whether mail to this account is read as commands (the listener runs only where true).
    #: Default: true for the first account only, so an account for the MCP mail tools runs nothing.
    commands: bool = True
    #: RFC 2971 ID fields sent after login when the server offers ID (163/126 refuse SELECT without
    #: it); None (``imap_id: false``): no ID is sent.
    imap_id: Mapping[str, str] | None = field(default_factory=lambda: default_imap_id())
    #: APPEND a copy of every mail Carrier sends (tools and command replies) to the Sent folder.
    save_sent: bool = True
    #: The mail tools only read this mailbox: every tool that sends or changes mail is refused.
    read_only: bool = False
    #: ``password``: LOGIN/AUTH PLAIN with the password; ``oauth2``: XOAUTH2/OAUTHBEARER with access
    #: tokens from the refresh token in password_file/password_env, using the ``oauth2`` settings.
    auth: MailAuth = "password"
    oauth2: OAuth2Settings | None = None
    #: ``EMAIL_PASS``, kept in memory only; wins over password_env / password_file.
    password_override: str | None = field(default=None, repr=False, compare=False)
    #: The environment ``password_env`` is looked up in (the one given to :func:`load_config`).
    environ: Mapping[str, str] = field(default_factory=_no_env, repr=False, compare=False)

    def password(self) -> str:
        """The account's password, read now from its variable or file; ConfigError says how to fix it."""
        if self.password_override:
            return self.password_override
        if not (self.password_env or self.password_file):
            raise ConfigProblems([f"account {self.name}: {_MSG_NO_LOGIN}"])
        if self.auth == "oauth2" and self.password_file is not None and not self.password_file.exists():
            raise ConfigProblems([f"account {self.name}: no OAuth2 refresh token yet ({self.password_file} "
                                  f"does not exist): run `carrier auth mail-login {self.name}`"])
        try:
            return _read_secret(self.password_env, self.password_file, self.environ)
        except _Invalid as exc:
            raise ConfigProblems([f"account {self.name}: {exc}"]) from None


@dataclass(frozen=True, kw_only=True)
class McpSettings:
    bind_host: str = "127.0.0.1"
    port: int = 18443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ip_allow: tuple[IPNetwork, ...] = ()
    ip_deny: tuple[IPNetwork, ...] = ()
    #: Reverse proxies whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed (CIDRs). Empty:
    #: the headers are ignored from everyone, loopback included, so no local process can pose as
    #: another address to get past ``ip_allow`` or the per-address rate limit.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Seconds a client has, from its first byte, to send a whole request (headers and body); a
    #: connection that dribbles is closed, so slow clients cannot hold the door's sockets.
    request_timeout: int = 10
    #: Seconds an idle keep-alive connection stays open between requests.
    keepalive_timeout: int = 5
    #: Open connections at most; more are closed at once (after the TLS handshake).
    max_connections: int = 256
    #: Role of the local user on the stdio door (no token there); None: operator, else the first role.
    stdio_role: str | None = None


@dataclass(frozen=True, kw_only=True)
class Admin:
    email: str
    fingerprint: str  # 40 upper-case hex digits


@dataclass(frozen=True, kw_only=True)
class User:
    email: str
    fingerprint: str  # 40 upper-case hex digits
    role: str


@dataclass(frozen=True, kw_only=True)
class Role:
    playbooks: tuple[str, ...] = ()
    hosts: str = "all"
    exec: bool = False
    shell: bool = False
    pty: bool = False
    #: Ad-hoc Ansible modules this role may run (globs, e.g. ``ping``, ``service``).
    modules: tuple[str, ...] = ()
    #: MCP mail tools this role may call (globs over tool names, e.g. ``mail_*``).
    mail: tuple[str, ...] = ()
    #: May target the Carrier controller itself: inventory hosts with ``connection: local`` or an
    #: address of this machine, and catalog playbooks marked ``controller: true``. Off by default.
    local: bool = False
    #: The programs this role may run (exec, terminal jobs, the ad-hoc ``command`` module), each a
    #: program (absolute path or bare name) and its argument patterns, as split from
    #: ``commands:`` entries such as ``systemctl status *``. None (no ``commands:``): any program
    #: except interpreters and launchers when ``shell`` is false (see carrier.auth.policy).
    commands: tuple[tuple[str, ...], ...] | None = None
    #: May add, list and remove its own schedules (admins always may).
    schedules: bool = False
    #: The named secret (``secrets:``) given to Ansible as this role's become (sudo) password.
    become_secret: str | None = None
    #: Named secrets this role may type into its terminal jobs (``job_input(secret=...)``).
    secrets: tuple[str, ...] = ()
    #: Terminal jobs answer a ``[sudo] password for`` prompt with ``become_secret`` by themselves.
    auto_sudo: bool = False


@dataclass(frozen=True, kw_only=True)
class Limits:
    rate_limit: int = 60
    rate_limit_window: int = 60
    max_jobs: int = 8
    max_jobs_per_host: int = 2
    output_max_bytes: int = 1048576
    #: ``enroll`` requests (each may make a WKD and a keyserver lookup) per address and per domain
    #: within ``enroll_window`` seconds.
    enroll_per_address: int = 3
    enroll_per_domain: int = 20
    enroll_window: int = 3600


@dataclass(frozen=True, kw_only=True)
class KeyserverSettings:
    url: str = "https://keys.openpgp.org"
    timeout: float = 10.0
    #: Look keys up by WKD (the sender's domain) before asking the keyserver.
    wkd: bool = True
    #: Replaces ``https://<domain>`` in WKD lookups (a private WKD server, tests).
    wkd_url: str | None = None


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    """Where Carrier keeps its state: the embedded SQLite file (no ``url``) or PostgreSQL."""

    #: ``postgresql://user@host:port/dbname`` (no password in it); None: ``<state_dir>/carrier.db``.
    url: str | None = None
    #: The PostgreSQL password, on one line (mode 0600); or use libpq's ~/.pgpass / PGPASSFILE.
    password_file: Path | None = None

    def dsn(self) -> str | None:
        """The URL to connect with (password included: never log it); None for SQLite."""
        if self.url is None:
            return None
        if self.password_file is None:
            return self.url
        from urllib.parse import quote

        password = quote(_read_secret_file(self.password_file), safe="")
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.replace('@', f':{password}@', 1)}"


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    #: Seconds an enrollment challenge (its single-use nonce) stays valid.
    challenge_ttl: int = 86400
    #: Seconds after its signature time that a signed command is still accepted.
    signature_max_age: int = 900
    #: Seconds a signature time may lie in the future (clocks differ).
    clock_skew: int = 300
    #: Refuse shell metacharacters in exec/PTY commands of roles without ``shell``.
    strict_commands: bool = False
    #: Role of an approved enrollment when the admin names none.
    default_role: str = "viewer"
    #: Lifetime of an MCP token when none is asked for, and the longest one issued.
    token_ttl: int = 2592000
    token_max_ttl: int = 31536000
    #: The audit chain's HMAC key (mode 0600, outside the state directory); ``None`` means
    #: ``audit.key`` beside carrier.yml. Made at first start when missing.
    audit_key_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class LlmSettings:
    enabled: bool = False
    api_url: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    model: str | None = None
    #: ``LLM_API_KEY``, kept in memory only; wins over api_key_env / api_key_file.
    api_key_override: str | None = field(default=None, repr=False, compare=False)
    environ: Mapping[str, str] = field(default_factory=_no_env, repr=False, compare=False)

    def api_key(self) -> str | None:
        """The API key, or None when none is configured (a local server may need none)."""
        if self.api_key_override:
            return self.api_key_override
        if not (self.api_key_env or self.api_key_file):
            return None
        try:
            return _read_secret(self.api_key_env, self.api_key_file, self.environ)
        except _Invalid as exc:
            raise ConfigProblems([f"llm: {exc}"]) from None


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    level: str = "INFO"


@dataclass(frozen=True, kw_only=True)
class AnsibleSettings:
    #: The Ansible strategy of playbook and ad-hoc runs (``carrier.ansible.strategy``); a playbook's
    #: catalog metadata may name its own.
    strategy: str = DEFAULT_STRATEGY
    #: ``warm``: runs are forked from a pre-imported worker (``carrier.ansible.zygote``); ``cold``:
    #: a new interpreter per run.
    worker: str = DEFAULT_WORKER


@dataclass(frozen=True, kw_only=True)
class PtySettings:
    #: How tmux-backed PTY jobs' output reaches Carrier: ``pipe`` (raw bytes, ``carrier.jobs.ptypipe``)
    #: or ``control`` (tmux control mode's escaped ``%output``).
    tmux_output: str = TMUX_OUTPUT


@dataclass(frozen=True, kw_only=True)
class MailSettings:
    #: Where ``mail_attachment_get(save_to=...)`` may write and ``mail_send`` attachments by path
    #: may be read from; ``None`` in the file means ``<state_dir>/downloads``.
    download_dir: Path | None = None
    #: Command lines run per mail at most (a longer list runs nothing and is answered).
    max_commands: int = 20
    #: Seconds between progress mails of a long run started by mail (at most one per interval).
    progress_interval: float = 300.0
    #: Characters of job output in a reply body; a longer log goes along as an attachment.
    body_limit: int = 20000
    #: Command mails larger than this (bytes) are never fetched: recorded as dropped, no reply.
    max_message_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Secret:
    """One named secret, by reference only: a file, an environment variable or an Ansible Vault file.

    Its value is read when used (carrier.secretstore), never kept in the configuration.
    """

    name: str
    file: Path | None = None
    env: str | None = None
    #: An Ansible Vault encrypted file holding the secret, and the file with its vault password.
    vault_file: Path | None = None
    vault_password_file: Path | None = None
    environ: Mapping[str, str] = field(default_factory=_no_env, repr=False, compare=False)
@dataclass(frozen=True)
class ExecutionNode:
    """A machine that runs plays for some inventory groups (``execution_nodes:``; docs/nodes.md)."""

    name: str
    #: An inventory host name, or ``user@host`` / ``user@host:port`` reached with Carrier's ssh options.
    target: str
    groups: tuple[str, ...]
    capacity: int = 4
    #: The ``ansible-runner`` command on the node (a bare name found on its PATH, or an absolute path).
    ansible_runner: str = "ansible-runner"
    #: Where runs unpack on the node (each in ``<work_dir>/carrier-<job id>``, deleted afterwards).
    work_dir: str = "/tmp"  # noqa: S108 - a directory on the node; each run makes its own 0700 one


def _default_roles() -> Mapping[str, Role]:
    return MappingProxyType(
        {
            "operator": Role(playbooks=("*",), hosts="all", exec=True, shell=False, pty=True),
            "viewer": Role(),
        }
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    path: Path
    state_dir: Path
    inventory: Path
    playbook_dirs: tuple[Path, ...] = ()
    gnupg_home: Path
    accounts: tuple[MailAccount, ...]
    mcp: McpSettings = field(default_factory=McpSettings)
    admins: tuple[Admin, ...] = ()
    users: tuple[User, ...] = ()
    roles: Mapping[str, Role] = field(default_factory=_default_roles)
    allowed_senders: tuple[str, ...] = ()
    admin_contacts: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    keyserver: KeyserverSettings = field(default_factory=KeyserverSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    llm: LlmSettings = field(default_factory=LlmSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    mail: MailSettings = field(default_factory=MailSettings)
    secret_refs: Mapping[str, Secret] = field(default_factory=lambda: MappingProxyType({}))
    execution_nodes: tuple[ExecutionNode, ...] = ()
    ansible: AnsibleSettings = field(default_factory=AnsibleSettings)
    pty: PtySettings = field(default_factory=PtySettings)

    @property
    def default_account(self) -> MailAccount:
        """The first account (the one the environment overrides apply to)."""
        return self.accounts[0]

    def account(self, name: str) -> MailAccount:
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts)
        raise ConfigProblems([f"no mail account named {name!r} (accounts: {known})"])

    def secrets(self) -> list[str]:
        """Every secret value that can be resolved now (for log redaction); unreadable ones are skipped."""
        getters: list[Callable[[], str | None]] = [a.password for a in self.accounts]
        getters += [a.oauth2.client_secret for a in self.accounts if a.oauth2 is not None]
        getters.append(self.llm.api_key)
        from carrier.secretstore import secret_value  # secretstore reads configs: imported late

        for ref in self.secret_refs.values():
            getters.append(functools.partial(secret_value, ref))
        found: list[str] = []
        for get in getters:
            try:
                value = get()
            except ConfigError:
                continue
            if value and value not in found:
                found.append(value)
        return found


# ---------------------------------------------------------------------------------------------
# Secrets by reference
# ---------------------------------------------------------------------------------------------

_MSG_NO_LOGIN = "no password: set password_file or password_env (or EMAIL_PASS for the default account)"
_MSG_INLINE_MAIL = "inline passwords are not allowed: use password_file or password_env"
_MSG_INLINE_OAUTH = ("inline secrets are not allowed: the refresh token goes in the account's password_file "
                     "or password_env, the client secret in client_secret_file or client_secret_env")
_MSG_INLINE_LLM = "inline API keys are not allowed: use api_key_file or api_key_env"
_MSG_INLINE_OTHER = (
    "secrets are not allowed in carrier.yml: keep them in a mode 0600 file or an environment variable"
)
_SECRET_NAMES = frozenset({"pass", "password", "passwd", "secret", "token", "api_key", "apikey"})
_SECRET_SUFFIXES = ("_pass", "_password", "_passwd", "_secret", "_token", "_api_key", "_apikey")


class _Invalid(Exception):
    """A value is wrong; the message says what and how to fix it (the location is added by the caller)."""


class _Reported(Exception):
    """A section had problems that were already recorded."""


def _loose_mode(path: Path, mode: int) -> str | None:
    """The problem with a secret-holding file's permissions, or None when it is 0600 or stricter."""
    if not mode & 0o077:
        return None
    what = "readable" if mode & 0o044 else "writable"
    return f"{path.name} is {what} by group/others (mode {mode & 0o777:04o}): run `chmod 600 {path}`"


def _read_secret_file(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _Invalid(f"{path} does not exist: create it (mode 0600) with the secret on one line") from None
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Invalid(f"{path} is not a regular file")
    loose = _loose_mode(path, st.st_mode)
    if loose:
        raise _Invalid(loose)
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise _Invalid(f"cannot read {path}: {reason}") from None
    if not value:
        raise _Invalid(f"{path} is empty: put the secret in it")
    return value


def _read_owned_secret_file(path: Path) -> str:
    """``_read_secret_file`` for a named secret: the file must also belong to the user running Carrier."""
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = os.geteuid()  # missing/unreadable: _read_secret_file says what is wrong
    if owner != os.geteuid():
        raise _Invalid(f"{path} is owned by uid {owner}, not by the user running Carrier "
                       f"(uid {os.geteuid()}): `chown` it to that user")
    return _read_secret_file(path)


def _read_secret(env_name: str | None, path: Path | None, env: Mapping[str, str]) -> str:
    """A secret from an environment variable or a file (exactly one of them is set)."""
    if env_name:
        value = env.get(env_name, "")
        if not value:
            raise _Invalid(f"environment variable {env_name} is not set: export it or use a file")
        return value
    assert path is not None
    return _read_secret_file(path)


# ---------------------------------------------------------------------------------------------
# Reading context: where a value came from (line or environment variable), and the problems found
# ---------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    base_dir: Path
    home: Path
    env: Mapping[str, str]
    problems: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # dotted path -> environment variable(s)
    email_pass: str | None = None
    llm_key: str | None = None

    def origin(self, path: str) -> str | None:
        best = ""
        for prefix in self.origins:
            covers = path == prefix or path.startswith((prefix + ".", prefix + "["))
            if covers and len(prefix) > len(best):
                best = prefix
        return self.origins.get(best) if best else None


def _line_of(container: Any, key: str | int) -> int | None:
    lc = getattr(container, "lc", None)
    if lc is None:
        return None
    try:
        line = lc.item(key)[0] if isinstance(key, int) else lc.key(key)[0]
    except (KeyError, IndexError, TypeError):
        return None
    return int(line) + 1


@dataclass(frozen=True)
class _At:
    """A place in the configuration: its dotted path, the line it is on, the mapping read there."""

    ctx: _Ctx
    path: str = ""
    line: int | None = None
    node: Any = None

    def key(self, name: str, container: Any = None) -> _At:
        container = self.node if container is None else container
        path = f"{self.path}.{name}" if self.path else name
        return _At(self.ctx, path, _line_of(container, name) or self.line)

    def item(self, index: int, container: Any) -> _At:
        return _At(self.ctx, f"{self.path}[{index}]", _line_of(container, index) or self.line)

    def problem(self, message: str) -> None:
        var = self.ctx.origin(self.path)
        if var:
            where = f"{var} (sets {self.path})"
        elif self.line:
            where = f"{self.path or 'carrier.yml'} (line {self.line})"
        else:
            where = self.path or "carrier.yml"
        self.ctx.problems.append(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------
# Converters: (value, place) -> typed value, or raise _Invalid / _Reported
# ---------------------------------------------------------------------------------------------

Conv = Callable[[Any, _At], Any]
_REQUIRED: Any = object()


@dataclass(frozen=True)
class _F:
    conv: Conv
    default: Any = None
    need: str = ""  # what to tell a user when a required key is missing


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _str(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected non-empty text, got {_show(value)}")
    return str(value).strip()


def _bool(value: Any, at: _At) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise _Invalid(f"expected true or false, got {_show(value)}")


def _int(low: int, high: int | None = None, what: str = "a whole number") -> Conv:
    bounds = f"{low}-{high}" if high is not None else f">= {low}"

    def conv(value: Any, at: _At) -> int:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_digits = isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value) is not None
        number = int(value) if is_int or is_digits else None
        if number is None or number < low or (high is not None and number > high):
            raise _Invalid(f"{_show(value)} is not {what} ({bounds})")
        return number

    return conv


_port = _int(1, 65535, "a port number")
_positive = _int(1)


def _seconds(value: Any, at: _At) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        number = -1.0
    if number <= 0:
        raise _Invalid(f"{_show(value)} is not a number of seconds (> 0)")
    return number


def _choice(*options: str, upper: bool = False) -> Conv:
    def conv(value: Any, at: _At) -> str:
        text = str(value).strip() if isinstance(value, str) else ""
        text = text.upper() if upper else text.lower()
        if text not in options:
            raise _Invalid(f"{_show(value)} is not one of: {', '.join(options)}")
        return text

    return conv


_tls = _choice("implicit", "starttls", "none")
_level = _choice(*LOG_LEVELS, upper=True)


def _pattern(regex: str, what: str) -> Conv:
    compiled = re.compile(regex)

    def conv(value: Any, at: _At) -> str:
        text = _str(value, at)
        if not compiled.fullmatch(text):
            raise _Invalid(f"{_show(value)} is not {what}")
        return text

    return conv


_account_name = _pattern(r"[a-z0-9_-]+", "a valid name (lower-case letters, digits, _ and -)")
_env_name = _pattern(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")
_email = _pattern(r"[^@\s]+@[^@\s]+", "an email address")
_host = _pattern(r"[^\s/]+", "a host name or address")
_url = _pattern(r"https?://[^\s]+", "an http:// or https:// URL")


def _fingerprint(value: Any, at: _At) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{_show(value)} is not a key fingerprint: write it in quotes")
    text = "".join(value.split()).upper()
    if not re.fullmatch(r"[0-9A-F]{40}", text):
        raise _Invalid(f"{_show(value)} is not a fingerprint: expected 40 hex digits (spaces allowed)")
    return text


def _cidr(value: Any, at: _At) -> IPNetwork:
    text = _str(value, at)
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        near = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Invalid(
            f"{_show(value)} is not an IP network (CIDR such as 10.0.0.0/8 or 2001:db8::/32)"
        ) from None
    raise _Invalid(f"{_show(value)} has host bits set: did you mean {near}?")


def _expand_home(text: str, home: Path) -> Path:
    if text == "~" or text.startswith("~/"):
        return home / text[2:]
    return Path(os.path.expanduser(text))


def _path(value: Any, at: _At) -> Path:
    text = _str(value, at)
    path = _expand_home(text, at.ctx.home)
    if not path.is_absolute():
        path = at.ctx.base_dir / path
    return Path(os.path.normpath(path))


def _existing_file(value: Any, at: _At) -> Path:
    path = _path(value, at)
    if not path.is_file():
        raise _Invalid(f"{path} does not exist or is not a file")
    return path


def _inventory(value: Any, at: _At) -> Path:
    path = _path(value, at)
    if not path.exists():
        raise _Invalid(f"{path} does not exist: point inventory at an Ansible inventory file or directory")
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with path.open("rb") as handle:
                handle.read(1)
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror}") from None
    return path


def _playbook_dir(value: Any, at: _At) -> Path:
    path = _path(value, at)
    if not path.is_dir():
        raise _Invalid(f"{path} is not a directory: create it or remove it from playbook_dirs")
    return path


def _list(item: Conv) -> Conv:
    def conv(value: Any, at: _At) -> tuple[Any, ...]:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise _Invalid(f"expected a list (e.g. [a, b]), got {_show(value)}")
        out: list[Any] = []
        failed = False
        for index, element in enumerate(value):
            place = at.item(index, value)
            try:
                out.append(item(element, place))
            except _Invalid as exc:
                place.problem(str(exc))
                failed = True
            except _Reported:
                failed = True
        if failed:
            raise _Reported
        return tuple(out)

    return conv


# ---------------------------------------------------------------------------------------------
# The section reader
# ---------------------------------------------------------------------------------------------


def _looks_secret(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


def _unknown_key(key: str, spec: Mapping[str, _F], secret_hint: str) -> str:
    if _looks_secret(key):
        return secret_hint
    close = difflib.get_close_matches(key, list(spec), n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    return f"unknown key {key!r} (known keys: {', '.join(spec)})"


def _read(node: Any, spec: Mapping[str, _F], at: _At, secret_hint: str = _MSG_INLINE_OTHER) -> dict[str, Any]:
    """Check ``node`` against ``spec``: the converted values, defaults for absent keys.

    Keys whose value is wrong are recorded as problems and left out of the result, so builders can
    still run the checks that span fields on what is there.
    """
    if node is None:
        node = {}
    if not isinstance(node, Mapping):
        raise _Invalid(f"expected a mapping (key: value), got {_show(node)}")
    for key in node:
        if str(key) not in spec:
            at.key(str(key), node).problem(_unknown_key(str(key), spec, secret_hint))
    values: dict[str, Any] = {}
    for key, spec_field in spec.items():
        place = at.key(key, node)
        value = node.get(key)
        if value is None:
            if spec_field.default is _REQUIRED:
                place.problem("missing (required)" + (f": {spec_field.need}" if spec_field.need else ""))
            else:
                values[key] = spec_field.default
            continue
        try:
            values[key] = spec_field.conv(value, place)
        except _Invalid as exc:
            place.problem(str(exc))
        except _Reported:
            pass
    return values


Check = Callable[[dict[str, Any], _At], None]


def _section(
    cls: Callable[..., Any], spec: Mapping[str, _F], hint: str = _MSG_INLINE_OTHER, check: Check | None = None
) -> Conv:
    """A converter for a whole section: read its fields, run ``check`` across them, make ``cls``.

    ``check`` sees the fields that converted (a wrong one is missing), may add problems, and may
    fill in derived values (defaults that depend on other fields, in-memory secrets).
    """

    def conv(value: Any, at: _At) -> Any:
        before = len(at.ctx.problems)
        at = _At(at.ctx, at.path, at.line, value)
        values = _read(value, spec, at, hint)
        if check is not None:
            check(values, at)
        if len(at.ctx.problems) > before:
            raise _Reported
        return cls(**values)

    return conv


# ---------------------------------------------------------------------------------------------
# Checks across fields, and the schema
# ---------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _check_server(kind: Literal["imap", "smtp"]) -> Check:
    def check(values: dict[str, Any], at: _At) -> None:
        tls = values.get("tls") or DEFAULT_TLS[kind]
        host = values.get("host")
        if tls == "none" and host and not _is_loopback(host):
            at.key("tls").problem(
                f"tls: none sends the password in clear text and is allowed for loopback hosts only, "
                f"not {host}: use implicit or starttls"
            )
        values["tls"] = tls
        values["port"] = values.get("port") or DEFAULT_PORTS[kind][tls]

    return check


_IMAP: Mapping[str, _F] = {
    "host": _F(_host, _REQUIRED, "the IMAP server's host name"),
    "port": _F(_port),
    "tls": _F(_tls),
    "ca_file": _F(_existing_file),
    "allow_self_signed": _F(_bool, False),
}
_SMTP: Mapping[str, _F] = {
    **_IMAP,
    "host": _F(_host, _REQUIRED, "the SMTP server's host name"),
    "auth": _F(_bool, True),
}
_FOLDERS: Mapping[str, _F] = {name: _F(_str, default) for name, default in vars(Folders()).items()}


def _check_password(values: dict[str, Any], at: _At) -> None:
    override = at.ctx.email_pass if at.path == "accounts[0]" else None
    if values.get("commands", False) is None:
        values["commands"] = at.path == "accounts[0]"
    values["password_override"] = override
    values["environ"] = at.ctx.env
    values["username"] = values.get("username") or values.get("address")
    _check_mail_auth(values, at)
    if override or "password_env" not in values or "password_file" not in values:
        return  # EMAIL_PASS wins, or a wrong value is already reported
    env_name, path = values["password_env"], values["password_file"]
    if env_name and path:
        at.problem("both password_env and password_file are set: keep one")
    elif not (env_name or path):
        at.problem(_MSG_NO_LOGIN)
    elif values.get("auth") == "oauth2" and path is not None and not path.exists():
        pass  # no refresh token yet: `carrier auth mail-login` writes it (password() says so)
    else:
        try:
            _read_secret(env_name, path, at.ctx.env)
        except _Invalid as exc:
            at.key("password_env" if env_name else "password_file").problem(str(exc))


def _check_mail_auth(values: dict[str, Any], at: _At) -> None:
    """``auth: oauth2`` needs an ``oauth2:`` section, and the section needs ``auth: oauth2``."""
    auth, settings = values.get("auth"), values.get("oauth2")
    if auth == "oauth2" and settings is None and "oauth2" not in (at.node or {}):
        at.key("oauth2").problem("auth: oauth2 needs an oauth2: section "
                                 "(provider: google|microsoft|custom, client_id: ...)")
    elif auth == "password" and settings is not None:
        at.key("auth").problem("an oauth2: section is set but auth is password: set auth: oauth2 "
                               "(or remove the oauth2: section)")


def _check_oauth2(values: dict[str, Any], at: _At) -> None:
    values["environ"] = at.ctx.env
    provider = values.get("provider")
    if provider == "custom" and not values.get("token_url"):
        at.key("token_url").problem("provider: custom needs token_url (the provider's OAuth2 token endpoint)")
    if values.get("client_secret_file") and values.get("client_secret_env"):
        at.problem("both client_secret_file and client_secret_env are set: keep one")
    elif values.get("client_secret_file") or values.get("client_secret_env"):
        try:
            _read_secret(values.get("client_secret_env"), values.get("client_secret_file"), at.ctx.env)
        except _Invalid as exc:
            at.key("client_secret_env" if values.get("client_secret_env") else "client_secret_file").problem(
                str(exc))
    for key in ("token_url", "device_url"):
        url = values.get(key)
        host = urlsplit(url).hostname if url else None
        if url and url.startswith("http://") and not _is_loopback(host or ""):
            at.key(key).problem(f"http:// sends tokens in clear text and is allowed for loopback hosts only, "
                                f"not {host}: use https://")


def _scope(value: Any, at: _At) -> str:
    text = " ".join(_str(value, at).split())
    if not text.isprintable() or '"' in text or "\\" in text:
        raise _Invalid(f"{_show(value)} is not a space-separated list of OAuth2 scopes")
    return text


_OAUTH2: Mapping[str, _F] = {
    "provider": _F(_choice(*OAUTH2_PROVIDERS), _REQUIRED, "google, microsoft or custom"),
    "client_id": _F(_pattern(r"[\x21-\x7e]{1,512}", "an OAuth2 client id"), _REQUIRED,
                    "the client (application) id of your app registration"),
    "client_secret_file": _F(_path),
    "client_secret_env": _F(_env_name),
    "token_url": _F(_url),
    "device_url": _F(_url),
    "scope": _F(_scope),
    "tenant": _F(_pattern(r"[A-Za-z0-9.-]{1,100}", "an Entra tenant (common, organizations, an id...)"),
                 "common"),
    "mechanism": _F(_choice("xoauth2", "oauthbearer"), "xoauth2"),
}


def _imap_id(value: Any, at: _At) -> Mapping[str, str] | None:
    """``imap_id``: false (send none), true (the default fields), or a mapping of RFC 2971 fields."""
    if isinstance(value, bool):
        return default_imap_id() if value else None
    if not isinstance(value, Mapping) or not value:
        raise _Invalid(f"expected false, true or a mapping such as {{name: Carrier, version: '1.0'}}, "
                       f"got {_show(value)}")
    out: dict[str, str] = {}
    for key, text in value.items():
        if str(key) not in IMAP_ID_FIELDS:
            raise _Invalid(f"unknown ID field {str(key)!r} (RFC 2971 fields: {', '.join(IMAP_ID_FIELDS)})")
        if isinstance(text, bool) or not isinstance(text, str | int | float):
            raise _Invalid(f"ID field {key} must be text, got {_show(text)}")
        shown = str(text)
        if not shown.isprintable() or len(shown) > 1024 or not shown.strip():
            raise _Invalid(f"ID field {key} must be printable text of 1-1024 characters on one line")
        out[str(key)] = shown
    return MappingProxyType(out)


_ACCOUNT: Mapping[str, _F] = {
    "name": _F(_account_name, _REQUIRED, "a short name such as carrier"),
    "address": _F(_email, _REQUIRED, "the account's mail address (or set EMAIL_USER)"),
    "display_name": _F(_str, "Carrier"),
    "username": _F(_str),
    "password_env": _F(_env_name),
    "password_file": _F(_path),
    "imap": _F(
        _section(ImapSettings, _IMAP, _MSG_INLINE_MAIL, _check_server("imap")), _REQUIRED, "an imap: section"
    ),
    "smtp": _F(
        _section(SmtpSettings, _SMTP, _MSG_INLINE_MAIL, _check_server("smtp")), _REQUIRED, "an smtp: section"
    ),
    "folders": _F(_section(Folders, _FOLDERS), Folders()),
    "idle": _F(_bool, True),
    "check_interval": _F(_positive, 60),
    "commands": _F(_bool, None),  # None: true for the first account only (see _check_password)
    "imap_id": _F(_imap_id, default_imap_id()),
    "save_sent": _F(_bool, True),
    "read_only": _F(_bool, False),
    "auth": _F(_choice("password", "oauth2"), "password"),
    "oauth2": _F(_section(OAuth2Settings, _OAUTH2, _MSG_INLINE_OAUTH, _check_oauth2)),
}


def _accounts(value: Any, at: _At) -> tuple[MailAccount, ...]:
    read = _list(_section(MailAccount, _ACCOUNT, _MSG_INLINE_MAIL, _check_password))
    accounts: tuple[MailAccount, ...] = read(value, at)
    first: dict[str, int] = {}
    for index, account in enumerate(accounts):
        if account.name in first:
            at.item(index, value).problem(
                f"duplicate account name {account.name!r} (also accounts[{first[account.name]}]): "
                "names must be unique"
            )
        first.setdefault(account.name, index)
    if len(first) < len(accounts):
        raise _Reported
    return accounts


def _check_mcp(values: dict[str, Any], at: _At) -> None:
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        at.problem("set both tls_cert and tls_key, or neither")


_MCP: Mapping[str, _F] = {
    "bind_host": _F(_host, "127.0.0.1"),
    "port": _F(_port, 18443),
    "tls_cert": _F(_path),
    "tls_key": _F(_path),
    "ip_allow": _F(_list(_cidr), ()),
    "ip_deny": _F(_list(_cidr), ()),
    "trusted_proxies": _F(_list(_cidr), ()),
    "request_timeout": _F(_int(1, 3600), 10),
    "keepalive_timeout": _F(_int(1, 3600), 5),
    "max_connections": _F(_int(1, 100000), 256),
    "stdio_role": _F(_str, None, "the name of one of the roles"),
}
_ADMIN: Mapping[str, _F] = {"email": _F(_email, _REQUIRED), "fingerprint": _F(_fingerprint, _REQUIRED)}
_USER: Mapping[str, _F] = {**_ADMIN, "role": _F(_str, _REQUIRED, "the name of one of the roles")}
#: Characters a ``commands:`` program name may not contain (it is matched literally, not as a glob).
_PROGRAM_GLOB = re.compile(r"[*?\[\]]")


def _command_rule(value: Any, at: _At) -> tuple[str, ...]:
    """One ``commands:`` entry: ``PROGRAM [ARG-PATTERN ...]`` split like a shell would."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("expected a command such as `systemctl status *` or `/usr/bin/uptime`, "
                       f"got {_show(value)}")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise _Invalid("a command entry must be one line without NUL characters")
    try:
        words = tuple(shlex.split(value))
    except ValueError as exc:
        raise _Invalid(f"cannot split {value!r}: {exc} (quote arguments as in a shell)") from None
    if not words:
        raise _Invalid("a command entry names no program")
    program = words[0]
    if program.startswith("-"):
        raise _Invalid(f"{value!r} starts with {program!r}: the first word is the program, not an option")
    if _PROGRAM_GLOB.search(program):
        raise _Invalid(f"the program {program!r} contains a glob character: name one program "
                       "(an absolute path or a bare name); patterns are for its arguments")
    if "/" in program and not program.startswith("/"):
        raise _Invalid(f"the program {program!r} is a relative path: give an absolute path or a bare name")
    return words


_ROLE: Mapping[str, _F] = {
    "playbooks": _F(_list(_str), ()),
    "hosts": _F(_str, "all"),
    "exec": _F(_bool, False),
    "shell": _F(_bool, False),
    "pty": _F(_bool, False),
    "modules": _F(_list(_str), ()),
    "mail": _F(_list(_str), ()),
    "local": _F(_bool, False),
    "commands": _F(_list(_command_rule), None),
    "schedules": _F(_bool, False),
    "become_secret": _F(_str),
    "secrets": _F(_list(_str), ()),
    "auto_sudo": _F(_bool, False),
}


def _roles(value: Any, at: _At) -> Mapping[str, Role]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected a mapping of role name to role, got {_show(value)}")
    roles: dict[str, Role] = {}
    failed = False
    read_role = _section(Role, _ROLE)
    for name, spec in value.items():
        place = at.key(str(name), value)
        try:
            roles[str(name)] = read_role(spec, place)
        except _Invalid as exc:
            place.problem(str(exc))
            failed = True
        except _Reported:
            failed = True
    if failed:
        raise _Reported
    return MappingProxyType(roles)


_SECRET_SOURCES = ("file", "env", "vault_file")
_SECRET: Mapping[str, _F] = {
    "file": _F(_path),
    "env": _F(_env_name),
    "vault_file": _F(_path),
    "vault_password_file": _F(_path),
}
#: What a secret's name looks like (one place: config, doors and engines check names with it).
SECRET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _check_secret(values: dict[str, Any], at: _At) -> None:
    values["environ"] = at.ctx.env
    values["name"] = at.path.rsplit(".", 1)[-1]
    given = [key for key in _SECRET_SOURCES if values.get(key)]
    if len(given) != 1:
        at.problem("give exactly one of file, env or vault_file "
                   f"({'none' if not given else ', '.join(given)} given); inline values are not allowed")
    if bool(values.get("vault_file")) != bool(values.get("vault_password_file")):
        at.problem("vault_file and vault_password_file go together: set both")
    for key in ("file", "vault_password_file"):  # mode and owner now; the value when it is used
        if values.get(key):
            try:
                _read_owned_secret_file(values[key])
            except _Invalid as exc:
                at.key(key).problem(str(exc))


def _secrets(value: Any, at: _At) -> Mapping[str, Secret]:
    if not isinstance(value, Mapping):
        raise _Invalid("expected a mapping of secret name to its source (file/env/vault_file), "
                       f"got {_show(value)}")
    out: dict[str, Secret] = {}
    failed = False
    read = _section(Secret, _SECRET, _MSG_INLINE_OTHER + " (use file, env or vault_file)", _check_secret)
    for name, spec in value.items():
        place = at.key(str(name), value)
        if not SECRET_NAME.fullmatch(str(name)):
            place.problem("a secret name is a letter then letters, digits, '_' or '-' (at most 64)")
            failed = True
            continue
        if not isinstance(spec, Mapping) or any(str(key) not in _SECRET for key in spec):
            # Never echo what is there: it may be the secret itself.
            place.problem("a secret is a mapping with one of file, env or vault_file "
                          f"(known keys: {', '.join(_SECRET)}); {_MSG_INLINE_OTHER}")
            failed = True
            continue
        try:
            out[str(name)] = read(spec, place)
        except _Invalid as exc:
            place.problem(str(exc))
            failed = True
        except _Reported:
            failed = True
    if failed:
        raise _Reported
    return MappingProxyType(out)


_LIMITS: Mapping[str, _F] = {name: _F(_positive, default) for name, default in vars(Limits()).items()}
_KEYSERVER: Mapping[str, _F] = {
    "url": _F(_url, KeyserverSettings.url),
    "timeout": _F(_seconds, 10.0),
    "wkd": _F(_bool, True),
    "wkd_url": _F(_url),
}


def _check_auth(values: dict[str, Any], at: _At) -> None:
    ttl, longest = values.get("token_ttl"), values.get("token_max_ttl")
    if ttl is not None and longest is not None and ttl > longest:
        at.key("token_ttl").problem(
            f"{ttl} is longer than token_max_ttl ({longest}): lower it or raise the cap"
        )


_AUTH: Mapping[str, _F] = {
    "challenge_ttl": _F(_positive, AuthSettings.challenge_ttl),
    "signature_max_age": _F(_positive, AuthSettings.signature_max_age),
    "clock_skew": _F(_int(0), AuthSettings.clock_skew),
    "strict_commands": _F(_bool, False),
    "default_role": _F(_str, AuthSettings.default_role),
    "token_ttl": _F(_positive, AuthSettings.token_ttl),
    "token_max_ttl": _F(_positive, AuthSettings.token_max_ttl),
    "audit_key_file": _F(_path),
}


def _check_llm(values: dict[str, Any], at: _At) -> None:
    values["api_key_override"] = at.ctx.llm_key
    values["environ"] = at.ctx.env
    env_name, path = values.get("api_key_env"), values.get("api_key_file")
    if env_name and path:
        at.problem("both api_key_env and api_key_file are set: keep one")
    if not values.get("enabled"):
        return
    for key in ("api_url", "model"):
        if key in values and not values[key]:
            at.problem(f"llm is enabled but {key} is not set: set llm.{key} (or LLM_{key.upper()})")
    if bool(env_name) != bool(path) and not at.ctx.llm_key:
        try:
            _read_secret(env_name, path, at.ctx.env)
        except _Invalid as exc:
            at.key("api_key_env" if env_name else "api_key_file").problem(str(exc))


def _store_url(value: Any, at: _At) -> str:
    import re

    text = _str(value, at)
    match = re.fullmatch(r"(postgresql|postgres)://([^:@/]+)@([^/@]+)/([A-Za-z0-9_]+)(\?[^\s]*)?", text)
    if re.match(r"[a-z]+://[^/@]*:[^/@]*@", text):
        raise _Invalid("store.url has a password in it: put the password in store.password_file "
                       "(mode 0600) or ~/.pgpass and give postgresql://user@host:port/dbname")
    if match is None:
        raise _Invalid(f"expected postgresql://user@host:port/dbname, got {_show(value)}; leave store.url "
                       "out to keep the embedded SQLite file")
    return text


def _check_store(values: dict[str, Any], at: _At) -> None:
    if values.get("password_file") is not None:
        if values.get("url") is None:
            at.problem("store.password_file is set but store.url is not: set the postgresql:// URL")
            return
        try:
            _read_secret_file(values["password_file"])
        except _Invalid as exc:
            at.key("password_file").problem(str(exc))


_STORE: Mapping[str, _F] = {
    "url": _F(_store_url),
    "password_file": _F(_path),
}

_LLM: Mapping[str, _F] = {
    "enabled": _F(_bool, False),
    "api_url": _F(_url),
    "api_key_env": _F(_env_name),
    "api_key_file": _F(_path),
    "model": _F(_str),
}

_MAIL: Mapping[str, _F] = {
    "download_dir": _F(_path),
    "max_commands": _F(_int(1, 1000), 20),
    "progress_interval": _F(_seconds, 300.0),
    "body_limit": _F(_int(1000), 20000),
    "max_message_bytes": _F(_int(1024), 10 * 1024 * 1024),
}
#: ``user@host[:port]`` or an inventory host name (letters, digits, ``_ . -``); nothing ssh could read
#: as an option (no leading ``-``, no spaces).
_NODE_TARGET_RE = re.compile(
    r"(?:(?P<user>[a-z_][a-z0-9_.-]{0,31})@)?(?P<host>[A-Za-z0-9][A-Za-z0-9_.-]{0,252})(?::(?P<port>\d{1,5}))?"
)
_NODE_WORK_DIR_RE = re.compile(r"/[A-Za-z0-9_./-]{0,39}")
_NODE_RUNNER_RE = re.compile(r"[A-Za-z0-9_.-]+|/[A-Za-z0-9_./-]+")


def _node_target(value: Any, at: _At) -> str:
    text = _str(value, at)
    match = _NODE_TARGET_RE.fullmatch(text)
    port = match.group("port") if match else None
    if match is None or (port is not None and not 1 <= int(port) <= 65535):
        raise _Invalid(f"{_show(value)} is not a node target: name an inventory host or write "
                       "user@host (optionally user@host:port)")
    return text


def _node_work_dir(value: Any, at: _At) -> str:
    text = _str(value, at).rstrip("/") or "/"
    if not _NODE_WORK_DIR_RE.fullmatch(text) or ".." in text.split("/"):
        raise _Invalid(f"{_show(value)} is not a work directory: an absolute path of at most 40 "
                       "characters (letters, digits, _ . - /), short enough for ssh control sockets")
    return text


def _node_runner(value: Any, at: _At) -> str:
    text = _str(value, at)
    if not _NODE_RUNNER_RE.fullmatch(text) or ".." in text.split("/"):
        raise _Invalid(f"{_show(value)} is not a command: give a bare name (ansible-runner) or an "
                       "absolute path (/opt/runner/bin/ansible-runner)")
    return text


def _check_node(values: dict[str, Any], at: _At) -> None:
    if "groups" in values and not values["groups"]:
        at.key("groups").problem("a node must serve at least one inventory group")


_NODE: Mapping[str, _F] = {
    "name": _F(_account_name, _REQUIRED, "a short name such as exec1"),
    "target": _F(_node_target, _REQUIRED, "an inventory host or user@host"),
    "groups": _F(_list(_pattern(r"[A-Za-z0-9_.-]+", "a group name")), _REQUIRED,
                 "the inventory groups whose hosts this node runs plays for"),
    "capacity": _F(_int(1, 1000, "a number of jobs"), 4),
    "ansible_runner": _F(_node_runner, "ansible-runner"),
    "work_dir": _F(_node_work_dir, "/tmp"),  # noqa: S108 - see ExecutionNode.work_dir
}


def _execution_nodes(value: Any, at: _At) -> tuple[ExecutionNode, ...]:
    nodes: tuple[ExecutionNode, ...] = _list(_section(ExecutionNode, _NODE, check=_check_node))(value, at)
    first: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if node.name in first:
            at.item(index, value).problem(
                f"duplicate node name {node.name!r} (also execution_nodes[{first[node.name]}]): "
                "names must be unique")
        first.setdefault(node.name, index)
    if len(first) < len(nodes):
        raise _Reported
    return nodes


_ANSIBLE: Mapping[str, _F] = {"strategy": _F(_choice(*STRATEGIES), DEFAULT_STRATEGY),
                              "worker": _F(_choice(*WORKERS), DEFAULT_WORKER)}
_PTY: Mapping[str, _F] = {"tmux_output": _F(_choice(*TMUX_OUTPUTS), TMUX_OUTPUT)}
_TOP: Mapping[str, _F] = {
    "state_dir": _F(_path),
    "inventory": _F(_inventory, _REQUIRED, "set it to an Ansible inventory file or directory"),
    "playbook_dirs": _F(_list(_playbook_dir), ()),
    "gnupg_home": _F(_path),
    "accounts": _F(_accounts, ()),
    "mcp": _F(_section(McpSettings, _MCP, check=_check_mcp), McpSettings()),
    "admins": _F(_list(_section(Admin, _ADMIN)), ()),
    "users": _F(_list(_section(User, _USER)), ()),
    "roles": _F(_roles, _default_roles()),
    "allowed_senders": _F(_list(_email), ()),
    "admin_contacts": _F(_list(_email), ()),
    "limits": _F(_section(Limits, _LIMITS), Limits()),
    "keyserver": _F(_section(KeyserverSettings, _KEYSERVER), KeyserverSettings()),
    "store": _F(_section(StoreSettings, _STORE, check=_check_store), StoreSettings()),
    "auth": _F(_section(AuthSettings, _AUTH, check=_check_auth), AuthSettings()),
    "llm": _F(_section(LlmSettings, _LLM, _MSG_INLINE_LLM, _check_llm)),
    "logging": _F(_section(LoggingSettings, {"level": _F(_level, "INFO")}), LoggingSettings()),
    "mail": _F(_section(MailSettings, _MAIL), MailSettings()),
    "secrets": _F(_secrets, MappingProxyType({})),
    "execution_nodes": _F(_execution_nodes, ()),
    "ansible": _F(_section(AnsibleSettings, _ANSIBLE), AnsibleSettings()),
    "pty": _F(_section(PtySettings, _PTY), PtySettings()),
}


def _check_users(values: dict[str, Any], at: _At) -> None:
    if "roles" not in values:
        return  # the roles section has its own problems
    roles: Mapping[str, Role] = values["roles"]
    for index, user in enumerate(values.get("users", ())):
        if user.role not in roles:
            close = difflib.get_close_matches(user.role, list(roles), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            place = at.key("users").item(index, at.node.get("users"))
            place.problem(f"role {user.role!r} is not defined: {hint}roles are {', '.join(roles) or 'none'}")
    mcp = values.get("mcp")
    if isinstance(mcp, McpSettings) and mcp.stdio_role is not None and mcp.stdio_role not in roles:
        at.key("mcp").key("stdio_role", at.node.get("mcp")).problem(
            f"role {mcp.stdio_role!r} is not defined: roles are {', '.join(roles) or 'none'}")


def _check_role_secrets(values: dict[str, Any], at: _At) -> None:
    """Every secret a role names is defined under ``secrets:``; auto_sudo needs a become_secret."""
    if "roles" not in values or "secrets" not in values:
        return
    known: Mapping[str, Secret] = values["secrets"]
    roles_node = at.node.get("roles") if isinstance(at.node, Mapping) else None
    for name, role in values["roles"].items():
        place = at.key("roles").key(name, roles_node)
        wanted = ([role.become_secret] if role.become_secret else []) + list(role.secrets)
        for secret in wanted:
            if secret not in known:
                close = difflib.get_close_matches(secret, list(known), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                place.problem(f"secret {secret!r} is not defined under secrets: {hint}"
                              f"secrets are {', '.join(known) or 'none'}")
        if role.auto_sudo and not role.become_secret:
            place.problem("auto_sudo needs become_secret: name the secret that answers sudo")


def _missing_account(ctx: _Ctx) -> str:
    unset = [var for var in ("IMAP_SERVER", "SMTP_SERVER", "EMAIL_USER") if not ctx.env.get(var)]
    return (
        "no mail account: add one under accounts: or set IMAP_SERVER, SMTP_SERVER and EMAIL_USER "
        f"(unset: {', '.join(unset)})"
    )


def _build_config(root: Any, path: Path, ctx: _Ctx) -> Config:
    at = _At(ctx, node=root)
    values = _read(root, _TOP, at)
    _check_users(values, at)
    _check_role_secrets(values, at)
    if "accounts" in values and not values["accounts"]:
        at.key("accounts").problem(_missing_account(ctx))
    if ctx.problems:
        raise ConfigProblems(ctx.problems, path)
    state_dir = values["state_dir"] or ctx.home / DEFAULT_STATE_DIR
    values["gnupg_home"] = values["gnupg_home"] or state_dir / "gnupg"
    values["llm"] = values["llm"] or LlmSettings(api_key_override=ctx.llm_key, environ=ctx.env)
    mail = values["mail"]
    values["mail"] = replace(mail, download_dir=mail.download_dir or state_dir / "downloads")
    values["secret_refs"] = values.pop("secrets")
    return Config(**{**values, "state_dir": state_dir}, path=path)


# ---------------------------------------------------------------------------------------------
# Environment overrides (the previous system's variable names)
# ---------------------------------------------------------------------------------------------

#: variable -> (section path, key); the value goes in as text and is checked like the file's.
_ENV_SCALARS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "USE_IMAP_IDLE": (("accounts[0]",), "idle"),
    "EMAIL_CHECK_INTERVAL": (("accounts[0]",), "check_interval"),
    "MCP_PORT": (("mcp",), "port"),
    "MCP_BIND_HOST": (("mcp",), "bind_host"),
    "RATE_LIMIT": (("limits",), "rate_limit"),
    "RATE_LIMIT_WINDOW": (("limits",), "rate_limit_window"),
    "LLM_ENABLED": (("llm",), "enabled"),
    "LLM_API_URL": (("llm",), "api_url"),
    "LLM_MODEL": (("llm",), "model"),
    "IMAP_SERVER": (("accounts[0]", "imap"), "host"),
    "SMTP_SERVER": (("accounts[0]", "smtp"), "host"),
    "EMAIL_USER": (("accounts[0]",), "username"),
}
#: variable -> (section path, key) for comma-separated lists.
_ENV_LISTS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "ADMIN_EMAIL": ((), "admin_contacts"),
    "ALLOWED_SENDERS": ((), "allowed_senders"),
    "IP_WHITELIST": (("mcp",), "ip_allow"),
    "IP_BLACKLIST": (("mcp",), "ip_deny"),
}
_ACCOUNT_VARS = ("IMAP_SERVER", "SMTP_SERVER", "EMAIL_USER")


def _split_host_port(text: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", text)
    if match:
        return match.group(1), match.group(2)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def _descend(root: MutableMapping[str, Any], steps: tuple[str, ...]) -> MutableMapping[str, Any] | None:
    """The mapping at ``steps`` (``accounts[0]`` is the first account), made when absent."""
    node = root
    for step in steps:
        if step == "accounts[0]":
            accounts = node.get("accounts")
            child = accounts[0] if isinstance(accounts, list) and accounts else None
        else:
            if node.get(step) is None:
                node[step] = {}
            child = node[step]
        if not isinstance(child, MutableMapping):
            return None
        node = child
    return node


def _set(
    root: MutableMapping[str, Any], ctx: _Ctx, var: str, steps: tuple[str, ...], key: str, value: Any
) -> None:
    node = _descend(root, steps)
    if node is None:
        return  # no such account/section: reported by the reader
    node[key] = value
    ctx.origins[".".join((*steps, key))] = var


def _env_account(root: MutableMapping[str, Any], ctx: _Ctx) -> None:
    """Make the ``default`` account from IMAP_SERVER/SMTP_SERVER/EMAIL_USER when the file has none."""
    if root.get("accounts") or not all(ctx.env.get(var) for var in _ACCOUNT_VARS):
        return
    root["accounts"] = [{"name": "default", "imap": {"tls": "implicit"}, "smtp": {"tls": "starttls"}}]
    ctx.origins["accounts[0]"] = "/".join(_ACCOUNT_VARS)


def _apply_env(root: Any, ctx: _Ctx) -> Any:
    """Put the environment's overrides into the parsed file, remembering which variable set what."""
    if root is None:
        root = {}
    if not isinstance(root, MutableMapping):
        return root
    env = {name: value for name, value in ctx.env.items() if value}  # an empty variable counts as unset
    _env_account(root, ctx)
    for var, (steps, key) in _ENV_SCALARS.items():
        if var not in env:
            continue
        value: str | None = env[var]
        if var in ("IMAP_SERVER", "SMTP_SERVER"):
            value, port = _split_host_port(env[var])
            if port is not None:
                _set(root, ctx, var, steps, "port", port)
        _set(root, ctx, var, steps, key, value)
    account = _descend(root, ("accounts[0]",))
    if "EMAIL_USER" in env and account is not None and not account.get("address"):
        _set(root, ctx, "EMAIL_USER", ("accounts[0]",), "address", env["EMAIL_USER"])
    for var, (steps, key) in _ENV_LISTS.items():
        if var in env:
            items = [part.strip() for part in env[var].split(",") if part.strip()]
            _set(root, ctx, var, steps, key, items)
    ctx.email_pass = env.get("EMAIL_PASS")
    ctx.llm_key = env.get("LLM_API_KEY")
    return root


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def resolve_config_path(cli_path: str | Path | None, env: Mapping[str, str]) -> Path:
    """The config file: ``--config``, then ``$CARRIER_CONFIG``, then ``~/.config/carrier/carrier.yml``."""
    chosen = cli_path or env.get("CARRIER_CONFIG")
    if chosen:
        return _expand_home(str(chosen), _home(env))
    return _home(env) / DEFAULT_CONFIG


def _read_text(path: Path) -> str:
    """The file's text, after the existence and 0600 checks (each of which alone stops loading)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigProblems(
            [
                f"no config file at {path}: `carrier sandbox up` writes a ready one, or write one by "
                "hand (docs/configuration.md); choose the file with --config or CARRIER_CONFIG"
            ]
        ) from None
    except OSError as exc:
        raise ConfigProblems([f"cannot read {path}: {exc.strerror}"]) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigProblems([f"{path} is not a regular file"])
    loose = _loose_mode(path, st.st_mode)
    if loose:
        raise ConfigProblems([loose])
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigProblems([f"cannot read {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigProblems([f"{path} is not UTF-8 text"]) from None


def _parse(text: str, path: Path) -> Any:
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigProblems([f"YAML syntax error at {where}: {what}"], path) from None
    except YAMLError as exc:
        raise ConfigProblems([f"YAML syntax error: {exc}"], path) from None


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, check and type ``path`` with the environment's overrides; ConfigError lists every problem.

    ``env`` defaults to ``os.environ``; the accounts keep a reference to it for ``password()``.
    Nothing is created: not the state directory, not the GnuPG home.
    """
    env = os.environ if env is None else env
    path = Path(os.path.abspath(path))
    root = _parse(_read_text(path), path)
    ctx = _Ctx(base_dir=path.parent, home=_home(env), env=env)
    root = _apply_env(root, ctx)
    if not isinstance(root, Mapping):
        raise ConfigProblems(
            [f"the file must be a mapping of settings (key: value), got {_show(root)}"], path
        )
    return _build_config(root, path, ctx)


def check_config(path: Path, env: Mapping[str, str]) -> list[str]:
    """Every problem with the configuration at ``path`` (empty when it is fine), for ``carrier check``."""
    try:
        load_config(path, env)
    except ConfigProblems as exc:
        return exc.problems
    except ConfigError as exc:
        return [str(exc)]
    return []
